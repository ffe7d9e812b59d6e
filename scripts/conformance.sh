#!/usr/bin/env bash
# make conformance: runs the OpenSSL conformance suite (tests/conformance.rs) and prints one
# table row per case: what it shows, the NDcPP element it evidences, PASS or FAIL.
# Exits non-zero when any case fails, did not run, or has no row in the mapping below.
#
# Element numbers follow our reading of the NDcPP v2.2e DTLS SFRs (carried into v3.0e):
#   FCS_DTLSC_EXT.1  DTLS client: .1 version and suites, .2 reference identifier (RFC 6125),
#                    .3 no channel on an invalid server certificate, .4 supported groups,
#                    .5 invalid MAC, .6 replay
#   FCS_DTLSS_EXT.1  DTLS server: .1 version and suites, .2 deny other versions, .3 no handshake
#                    without a validated client, .5 invalid MAC, .6 replay
#   FCS_DTLSS_EXT.2  DTLS server mutual authentication: .1 X.509v3 client authentication,
#                    .2 no channel on an invalid client certificate
#   FIA_X509_EXT.1   certificate validation: .1 path, validity, extendedKeyUsage,
#                    .2 only basicConstraints CA:TRUE certificates act as CAs
# The extended master secret (RFC 7627) is project policy, listed under the version-and-suites
# element of each side.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO=${CARGO:-cargo}

# case name (without the case_ prefix) | what it shows | NDcPP element
mapping=$(
    cat <<'EOF'
openssl_client_interop|s_client -dtls1_2 (CA file, -verify_hostname localhost) to the server relay: DTLSv1.2, ECDHE-ECDSA-AES128-GCM-SHA256, EMS; NTP requests written through it get valid chronyd replies|FCS_DTLSS_EXT.1.1
socat_client_interop|socat OPENSSL-DTLS-CLIENT in front of the server relay: 5 NTP requests, 5 valid chronyd replies|FCS_DTLSS_EXT.1.1
socat_server_interop|client relay to socat OPENSSL-DTLS-SERVER in front of chronyd: 5 valid replies over one association|FCS_DTLSC_EXT.1.1
openssl_server_interop|client relay to s_server -dtls1_2: the only shared suites are ECDHE-ECDSA-AES128-GCM-SHA256 and ECDHE-RSA-AES128-GCM-SHA256 (ECDSA+SHA256:ECDSA+SHA384:RSA+SHA256:RSA+SHA384); a request arrives as one record, a reply written at s_server reaches the asking client|FCS_DTLSC_EXT.1.1, FCS_DTLSC_EXT.1.4
mutual_auth_interop|s_client with a client certificate from the trusted CA is accepted under --client-ca, its subject logged, its request answered|FCS_DTLSS_EXT.2.1
server_refuses_dtls1_0|s_client -dtls1 refused: reason=protocol_version|FCS_DTLSS_EXT.1.2
server_refuses_cbc_sha|s_client offering only ECDHE-ECDSA-AES128-SHA (CBC) refused: reason=no_shared_cipher|FCS_DTLSS_EXT.1.1
server_refuses_aes256_cbc|s_client offering only ECDHE-ECDSA-AES256-SHA (CBC) refused: reason=no_shared_cipher|FCS_DTLSS_EXT.1.1
server_refuses_ccm|s_client offering only ECDHE-ECDSA-AES128-CCM refused: reason=no_shared_cipher|FCS_DTLSS_EXT.1.1
server_refuses_ccm8|s_client offering only ECDHE-ECDSA-AES128-CCM8 refused: reason=no_shared_cipher|FCS_DTLSS_EXT.1.1
server_refuses_chacha20|s_client offering only ECDHE-ECDSA-CHACHA20-POLY1305 refused: reason=no_shared_cipher|FCS_DTLSS_EXT.1.1
server_refuses_x25519_only|s_client offering only the X25519 group refused with handshake_failure (NIST curves only): reason=no_shared_cipher|FCS_DTLSS_EXT.1.1
server_refuses_psk|s_client -psk offering only PSK-AES128-GCM-SHA256 refused: reason=no_shared_cipher|FCS_DTLSS_EXT.1.1
server_refuses_no_ems|s_client with Options = -ExtendedMasterSecret (-trace: no EMS in its ClientHello) refused: reason=no_extended_master_secret|FCS_DTLSS_EXT.1.1
client_refuses_dtls1_0_server|s_server -dtls1: no DTLS 1.0 association forms (the client offers only a DTLS 1.2 AEAD suite; the server aborts with handshake_failure, logged as reason=peer_alert)|FCS_DTLSC_EXT.1.1
client_refuses_no_ems_server|s_server with Options = -ExtendedMasterSecret (-trace: no EMS in its ServerHello) refused: reason=no_extended_master_secret|FCS_DTLSC_EXT.1.1
client_refuses_unknown_ca|server certificate from an untrusted CA refused: reason=unknown_ca|FCS_DTLSC_EXT.1.3, FIA_X509_EXT.1.1
client_refuses_wrong_dns_san|DNS SAN time.example.net (CN localhost) for reference identifier localhost refused: reason=name_mismatch|FCS_DTLSC_EXT.1.2
client_refuses_wrong_ip_san|IP SAN 127.0.0.2 (and DNS SAN localhost) for reference identifier 127.0.0.1 refused: reason=name_mismatch|FCS_DTLSC_EXT.1.2
client_refuses_expired|expired server certificate refused: reason=expired|FCS_DTLSC_EXT.1.3, FIA_X509_EXT.1.1
client_refuses_not_yet_valid|server certificate valid from tomorrow refused: reason=not_yet_valid|FCS_DTLSC_EXT.1.3, FIA_X509_EXT.1.1
client_refuses_no_server_auth_eku|server certificate with clientAuth EKU only refused: reason=wrong_usage|FCS_DTLSC_EXT.1.3, FIA_X509_EXT.1.1
client_refuses_issuer_not_ca|chain through an intermediate with CA:FALSE refused: reason=unknown_ca (the same chain with CA:TRUE is accepted)|FCS_DTLSC_EXT.1.3, FIA_X509_EXT.1.2
client_refuses_issuer_without_basic_constraints|chain through an intermediate without basicConstraints refused: reason=unknown_ca (with CA:TRUE accepted)|FCS_DTLSC_EXT.1.3, FIA_X509_EXT.1.2
client_refuses_self_signed_leaf|self-signed server certificate refused: reason=unknown_ca|FCS_DTLSC_EXT.1.3, FIA_X509_EXT.1.1
mutual_refuses_missing_cert|s_client without a certificate refused under --client-ca: reason=no_client_certificate|FCS_DTLSS_EXT.2.1
mutual_refuses_unknown_ca|client certificate from an untrusted CA refused: reason=unknown_ca|FCS_DTLSS_EXT.2.2, FIA_X509_EXT.1.1
mutual_refuses_expired|expired client certificate refused: reason=expired|FCS_DTLSS_EXT.2.2, FIA_X509_EXT.1.1
mutual_refuses_no_client_auth_eku|client certificate with serverAuth EKU only refused: reason=wrong_usage|FCS_DTLSS_EXT.2.2, FIA_X509_EXT.1.1
tampered_record_discarded|one ciphertext bit flipped in an application-data record, in the NTP transmit timestamp (no NTP check reads it, so only the GCM tag can catch it): record discarded, nothing reaches the time server, no drop_* counter moves, the association survives (next request answered)|FCS_DTLSS_EXT.1.5
replayed_record_discarded|an application-data record sent again: no second request at the time server, no second reply|FCS_DTLSS_EXT.1.6
old_association_record_discarded_after_rekey|after a rekey (a new association from the same address), a record of the old one whose sequence number (4) is ahead of the new one's (1), so only the keys can reject it, is discarded; the old one's close_notify does not end the new one, which carries on|FCS_DTLSS_EXT.1.6
plain_ntp_creates_no_state|a plain NTP datagram at the DTLS port: no reply, no association, counted as drop_not_client_hello=1|FCS_DTLSS_EXT.1.3
keys_rsa_server_with_openssl_client|server relay with an RSA-2048 certificate (PKCS#1 key) from an RSA-3072 CA: s_client gets ECDHE-RSA-AES128-GCM-SHA256, RSA signature, its request answered|FCS_DTLSS_EXT.1.1
keys_rsa_client_against_openssl_server|client relay to s_server with an RSA certificate: ECDHE-RSA-AES128-GCM-SHA256, a request arrives|FCS_DTLSC_EXT.1.1
keys_rsa_client_certificate_both_ways|RSA client certificates accepted: s_client's by the server relay (--client-ca), the client relay's by s_server -Verify|FCS_DTLSS_EXT.2.1
keys_sha384_signature_schemes_offered_and_used|-sigalgs ecdsa_secp384r1_sha384 / rsa_pkcs1_sha384 only, both directions: SHA-384 signatures made and accepted; a P-256 server under SHA-384 only refused: reason=no_shared_cipher|FCS_DTLSC_EXT.1.1, FCS_DTLSS_EXT.1.1
keys_client_offers_the_policy_suites_schemes_and_groups|the client relay's ClientHello as s_server reads it: the two AES-128-GCM suites, four SHA-256/384 schemes, secp256r1:secp384r1|FCS_DTLSC_EXT.1.1, FCS_DTLSC_EXT.1.4
keys_p384_group_and_groups_mismatch|s_client -groups P-384 gets secp384r1; s_server -groups X25519: the client relay gets no association|FCS_DTLSS_EXT.1.1, FCS_DTLSC_EXT.1.4
keys_p384_peers_accepted|a P-384 server certificate (P-384 CA, SHA-384) at the client relay, a P-384 client certificate at the server relay|FCS_DTLSC_EXT.1.1, FCS_DTLSS_EXT.2.1
keys_rsa1024_peers_refused|an RSA-1024 leaf from a trusted CA refused in both roles: reason=key_policy, naming the leaf and its key size|FIA_X509_EXT.1.1, FCS_DTLSC_EXT.1.3, FCS_DTLSS_EXT.2.2
keys_csr_signed_by_an_openssl_ca|certs --request server/client (RSA-3072): SANs and the role's EKU in the PKCS#10 request; signed by openssl x509 -req -copy_extensions, used in both roles|FIA_X509_EXT.3
keys_rsa_lab_pki_end_to_end|certs --key-type rsa-3072, ntpdate through both relays to chronyd: a reply over TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256|FCS_DTLSC_EXT.1.1
EOF
)

mkdir -p target
log=target/conformance.log
echo "conformance: cargo test --test conformance (full output in $log)" >&2
started=$(date +%s)
"$CARGO" test --test conformance >"$log" 2>&1
cargo_status=$?
elapsed=$(($(date +%s) - started))

declare -A result
while read -r name outcome; do
    result[$name]=$outcome
done < <(sed -n -E 's/^test case_([a-z0-9_]+) \.\.\. ([A-Za-z]+).*$/\1 \2/p' "$log")

failed=0
total=0
declare -A mapped
printf '| case | what it shows | NDcPP element | result |\n'
printf '|---|---|---|---|\n'
while IFS='|' read -r name shows element; do
    [[ -z $name ]] && continue
    mapped[$name]=1
    total=$((total + 1))
    case ${result[$name]:-} in
        ok) verdict=PASS ;;
        "") verdict="FAIL (did not run)"; failed=$((failed + 1)) ;;
        *) verdict=FAIL; failed=$((failed + 1)) ;;
    esac
    printf '| %s | %s | %s | %s |\n' "$name" "$shows" "$element" "$verdict"
done <<<"$mapping"
for name in "${!result[@]}"; do
    if [[ -z ${mapped[$name]:-} ]]; then
        total=$((total + 1))
        failed=$((failed + 1))
        printf '| %s | (no row in scripts/conformance.sh) | - | FAIL (unmapped) |\n' "$name"
    fi
done

echo
tests_took=$(sed -n -E 's/^test result: .* finished in ([0-9.]+s)$/\1/p' "$log")
echo "$((total - failed)) of $total cases passed; tests ran ${tests_took:-?}, cargo test ${elapsed}s in all (exit $cargo_status)."
if ((failed > 0 || cargo_status != 0)); then
    echo >&2
    echo "conformance: FAILED; from $log:" >&2
    sed -n '/^failures:$/,/^test result:/p' "$log" | grep -v '^\[' | tail -80 >&2
    exit 1
fi
