use super::*;
use crate::crypto::crypto_gcm::*;
use crate::prf::*;

/// The shared AES-128-GCM with SHA-256 implementation, parameterized over the key exchange and signature.
pub struct CipherSuiteAes128GcmSha256 {
    gcm: Option<CryptoGcm>,
    rsa: bool,
}

impl CipherSuiteAes128GcmSha256 {
    const PRF_MAC_LEN: usize = 0;
    const PRF_KEY_LEN: usize = 16;
    const PRF_IV_LEN: usize = 4;

    /// Builds an uninitialized AES-128-GCM with SHA-256 suite; keys are installed later via `init`.
    pub fn new(rsa: bool) -> Self {
        CipherSuiteAes128GcmSha256 { gcm: None, rsa }
    }
}

impl CipherSuite for CipherSuiteAes128GcmSha256 {
    fn to_string(&self) -> String {
        if self.rsa {
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".to_owned()
        } else {
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".to_owned()
        }
    }

    fn id(&self) -> CipherSuiteId {
        if self.rsa {
            CipherSuiteId::Tls_Ecdhe_Rsa_With_Aes_128_Gcm_Sha256
        } else {
            CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256
        }
    }

    fn certificate_type(&self) -> ClientCertificateType {
        if self.rsa {
            ClientCertificateType::RsaSign
        } else {
            ClientCertificateType::EcdsaSign
        }
    }

    fn hash_func(&self) -> CipherSuiteHash {
        CipherSuiteHash::Sha256
    }

    fn is_psk(&self) -> bool {
        false
    }

    fn is_initialized(&self) -> bool {
        self.gcm.is_some()
    }

    fn init(
        &mut self,
        provider: Arc<dyn RTCCryptoProvider>,
        master_secret: &[u8],
        client_random: &[u8],
        server_random: &[u8],
        is_client: bool,
    ) -> Result<()> {
        let keys = prf_encryption_keys(
            provider.crypto(),
            master_secret,
            client_random,
            server_random,
            EncryptionKeyLengths {
                mac: CipherSuiteAes128GcmSha256::PRF_MAC_LEN,
                key: CipherSuiteAes128GcmSha256::PRF_KEY_LEN,
                iv: CipherSuiteAes128GcmSha256::PRF_IV_LEN,
            },
            self.hash_func(),
        )?;

        if is_client {
            self.gcm = Some(CryptoGcm::new(
                provider,
                &keys.client_write_key,
                &keys.client_write_iv,
                &keys.server_write_key,
                &keys.server_write_iv,
            )?);
        } else {
            self.gcm = Some(CryptoGcm::new(
                provider,
                &keys.server_write_key,
                &keys.server_write_iv,
                &keys.client_write_key,
                &keys.client_write_iv,
            )?);
        }

        Ok(())
    }

    fn encrypt(&mut self, pkt_rlh: &RecordLayerHeader, raw: &[u8]) -> Result<Vec<u8>> {
        // ntp-dtls patch p5: the error is built only when it is returned, not for every record.
        let cg = self.gcm.as_mut().ok_or_else(|| {
            Error::Other("CipherSuite has not been initialized, unable to encrypt".to_owned())
        })?;
        cg.encrypt(pkt_rlh, raw)
    }

    // ntp-dtls patch p6: sealed straight into the datagram.
    fn encrypt_record(
        &mut self,
        pkt_rlh: &RecordLayerHeader,
        header: &[u8],
        payload: &[u8],
        buffer: bytes::BytesMut,
    ) -> Result<bytes::BytesMut> {
        let cg = self.gcm.as_mut().ok_or_else(|| {
            Error::Other("CipherSuite has not been initialized, unable to encrypt".to_owned())
        })?;
        cg.encrypt_record(pkt_rlh, header, payload, buffer)
    }

    fn decrypt(&mut self, input: &[u8]) -> Result<Vec<u8>> {
        // ntp-dtls patch p5: the error is built only when it is returned, not for every record.
        let cg = self.gcm.as_mut().ok_or_else(|| {
            Error::Other("CipherSuite has not been initialized, unable to decrypt".to_owned())
        })?;
        cg.decrypt(input)
    }

    // ntp-dtls patches p11 and p14: decrypted straight into the data, in `buffer`.
    fn decrypt_application_data(
        &mut self,
        input: &[u8],
        buffer: bytes::BytesMut,
    ) -> Result<bytes::BytesMut> {
        let cg = self.gcm.as_mut().ok_or_else(|| {
            Error::Other("CipherSuite has not been initialized, unable to decrypt".to_owned())
        })?;
        cg.decrypt_application_data_into(input, buffer)
    }
}
