#[cfg(test)]
mod renegotiation_info_test;

use super::*;
use shared::error::Error;

const RENEGOTIATION_INFO_HEADER_SIZE: usize = 5;

/// RenegotiationInfo allows a Client/Server to
/// communicate their renegotiation support
///
/// ## Specifications
///
/// * [RFC 5746]
///
/// [RFC 5746]: https://tools.ietf.org/html/rfc5746
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtensionRenegotiationInfo {
    pub(crate) renegotiated_connection: u8,
}

impl ExtensionRenegotiationInfo {
    // TypeValue returns the extension TypeValue
    /// The extension type this value is carried under.
    pub fn extension_value(&self) -> ExtensionValue {
        ExtensionValue::RenegotiationInfo
    }

    /// The encoded size of this message in bytes.
    pub fn size(&self) -> usize {
        3
    }

    /// marshal encodes the extension
    pub fn marshal<W: Write>(&self, writer: &mut W) -> Result<()> {
        writer.write_u16::<BigEndian>(1)?; //length
        writer.write_u8(self.renegotiated_connection)?;

        Ok(writer.flush()?)
    }

    /// Unmarshal populates the extension from encoded data
    pub fn unmarshal<R: Read>(reader: &mut R) -> Result<Self> {
        let l = reader.read_u16::<BigEndian>()?; //length
        if l == 0 {
            return Err(Error::ErrInvalidPacketLength);
        }

        // renegotiated_connection<0..255> (RFC 5746 3.2): its length byte is kept, so that a
        // non-empty one is seen for what it is rather than dropped as unparseable.
        let renegotiated_connection = reader.read_u8()?;
        if renegotiated_connection as u16 != l - 1 {
            return Err(Error::ErrInvalidPacketLength);
        }
        let mut verify_data = vec![0u8; renegotiated_connection as usize];
        reader.read_exact(&mut verify_data)?;

        Ok(ExtensionRenegotiationInfo {
            renegotiated_connection,
        })
    }
}
