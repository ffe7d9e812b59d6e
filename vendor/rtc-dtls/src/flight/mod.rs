pub(crate) mod flight0;
pub(crate) mod flight1;
pub(crate) mod flight2;
pub(crate) mod flight3;
pub(crate) mod flight4;
pub(crate) mod flight5;
pub(crate) mod flight6;

use crate::alert::*;
use crate::extension::*;
use crate::handshake::handshake_cache::*;
use crate::handshaker::*;
use crate::record_layer::*;
use crate::state::*;
use shared::error::Error;

use crate::config::HandshakeConfig;
use std::fmt;

/*
  DTLS messages are grouped into a series of message flights, according
  to the diagrams below.  Although each Flight of messages may consist
  of a number of messages, they should be viewed as monolithic for the
  purpose of timeout and retransmission.
  https://tools.ietf.org/html/rfc4347#section-4.2.4
  Client                                          Server
  ------                                          ------
                                      Waiting                 Flight 0

  ClientHello             -------->                           Flight 1

                          <-------    HelloVerifyRequest      Flight 2

  ClientHello              -------->                           Flight 3

                                             ServerHello    \
                                            Certificate*     \
                                      ServerKeyExchange*      Flight 4
                                     CertificateRequest*     /
                          <--------      ServerHelloDone    /

  Certificate*                                              \
  ClientKeyExchange                                          \
  CertificateVerify*                                          Flight 5
  [ChangeCipherSpec]                                         /
  Finished                -------->                         /

                                      [ChangeCipherSpec]    \ Flight 6
                          <--------             Finished    /

*/

#[derive(Clone, Debug)]
pub(crate) struct Packet {
    pub(crate) record: RecordLayer,
    pub(crate) should_encrypt: bool,
    pub(crate) reset_local_sequence_number: bool,
}

// RFC 5746 3.4 (client) and 3.6 (server): on an initial handshake a renegotiation_info
// extension, when present, must have an empty renegotiated_connection, or the handshake is
// aborted with a fatal handshake_failure. This implementation never renegotiates, so every
// handshake is an initial one.
pub(crate) fn check_initial_renegotiation_info(
    extensions: &[Extension],
) -> Result<(), (Option<Alert>, Option<Error>)> {
    for extension in extensions {
        if let Extension::RenegotiationInfo(e) = extension
            && e.renegotiated_connection != 0
        {
            return Err((
                Some(Alert {
                    alert_level: AlertLevel::Fatal,
                    alert_description: AlertDescription::HandshakeFailure,
                }),
                Some(Error::Other(
                    "renegotiation_info with a non-empty renegotiated_connection on an initial handshake"
                        .to_owned(),
                )),
            ));
        }
    }
    Ok(())
}

// RFC 5246 7.4.1.4: "There MUST NOT be more than one extension of the same type." A hello
// repeating an extension is refused with a fatal illegal_parameter. Only the extensions this
// implementation parses are checked (as OpenSSL does): the others are ignored, repeated or not.
pub(crate) fn check_no_duplicate_extensions(
    extensions: &[Extension],
) -> Result<(), (Option<Alert>, Option<Error>)> {
    for (i, extension) in extensions.iter().enumerate() {
        // At most one of each of the few types parsed, so this stops within a few steps.
        let value = extension.extension_value();
        if extensions[..i].iter().any(|e| e.extension_value() == value) {
            return Err((
                Some(Alert {
                    alert_level: AlertLevel::Fatal,
                    alert_description: AlertDescription::IllegalParameter,
                }),
                Some(Error::Other(format!("more than one {value:?} extension"))),
            ));
        }
    }
    Ok(())
}

pub(crate) trait Flight: fmt::Display + fmt::Debug + Send + Sync {
    fn is_last_send_flight(&self) -> bool {
        false
    }
    fn is_last_recv_flight(&self) -> bool {
        false
    }
    fn has_retransmit(&self) -> bool {
        true
    }

    fn parse(
        &self,
        //tx: &mut mpsc::Sender<mpsc::Sender<()>>,
        state: &mut State,
        cache: &HandshakeCache,
        cfg: &HandshakeConfig,
    ) -> Result<Box<dyn Flight>, (Option<Alert>, Option<Error>)>;

    fn generate(
        &self,
        state: &mut State,
        cache: &HandshakeCache,
        cfg: &HandshakeConfig,
    ) -> Result<Vec<Packet>, (Option<Alert>, Option<Error>)>;
}
