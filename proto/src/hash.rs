//! A keyed hash for the per-datagram tables whose keys come from the network (peer addresses,
//! NTP timestamps): cheaper than std's SipHash-1-3, and still keyed with per-process secret
//! randomness so that an attacker cannot choose keys that collide.
//!
//! The construction is vector multiply-shift (Dietzfelbinger 1996; Thorup, "High Speed Hashing
//! for Integers and Strings", 2015, section 3.5): the key is read as 64-bit words `x_i`, and the
//! hash is the top 64 bits of `(a_0 + Σ a_i·x_i) mod 2^128` with `a_i` uniformly random 128-bit
//! secrets. Thorup shows this family is strongly universal: for any two distinct keys of the same
//! length, and secrets unknown to whoever picks the keys, any `l` top bits of the output collide
//! with probability `2^-l`. hashbrown uses the low bits (bits 64.. of the sum, themselves the top
//! bits of the sum mod `2^(64+l)`, so equally universal) for the bucket and the top 7 for its tag.
//! What it does not give, and SipHash (a PRF) does, is protection against an attacker who
//! learns the secrets by timing lookups adaptively; std's HashMap DoS guidance is the same
//! trade that rustc, ahash and foldhash make for speed. Every key here is at most a few words
//! (an IPv6 socket address is 6), so each costs a few 128-bit multiplications, against SipHash's
//! ~20 rounds per lookup. The output goes through a fixed bijective finalizer ([`mix`]), because
//! the universality above is pairwise: it says nothing of how a structured set of keys (every
//! port of one address) lands in the low bits, and unmixed it lands badly. Keys longer than [`WORDS`] words fall back to SipHash for the rest.

use std::collections::HashMap;
use std::collections::hash_map::{DefaultHasher, RandomState};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::OnceLock;

/// Words absorbed by multiply-shift; beyond this, SipHash takes the rest.
const WORDS: usize = 8;

/// The per-process secrets: `a_0 .. a_WORDS`, and the RandomState for the fallback.
struct Secrets {
    a: [u128; WORDS + 1],
    fallback: RandomState,
}

fn secrets() -> &'static Secrets {
    static SECRETS: OnceLock<Secrets> = OnceLock::new();
    SECRETS.get_or_init(|| {
        // std's RandomState is keyed from the OS's random source; SipHash under that key is a
        // PRF, so its outputs for distinct inputs are the random words we need.
        let seed = RandomState::new();
        let mut a = [0u128; WORDS + 1];
        for (i, slot) in a.iter_mut().enumerate() {
            let hi = seed.hash_one((i as u64, 0u8));
            let lo = seed.hash_one((i as u64, 1u8));
            *slot = (u128::from(hi) << 64) | u128::from(lo);
        }
        Secrets {
            a,
            fallback: RandomState::new(),
        }
    })
}

/// The [`BuildHasher`] of [`KeyedHasher`]; every instance shares the process's secrets.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyedState;

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;
    #[inline(always)]
    fn build_hasher(&self) -> KeyedHasher {
        let secrets = secrets();
        KeyedHasher {
            secrets,
            sum: secrets.a[0],
            words: 0,
            overflow: None,
        }
    }
}

/// A HashMap keyed by [`KeyedState`].
pub type KeyedMap<K, V> = HashMap<K, V, KeyedState>;

/// Builds an empty [`KeyedMap`] with room for `capacity` entries.
pub fn keyed_map<K, V>(capacity: usize) -> KeyedMap<K, V> {
    HashMap::with_capacity_and_hasher(capacity, KeyedState)
}

/// MurmurHash3's 64-bit finalizer, a fixed bijection: it keeps every collision property of the
/// 64-bit multiply-shift output, and spreads what that output does not. Without it, keys that
/// differ in one word in steps of one (every port of one address) give a Weyl sequence
/// `c + a*x`, whose low 16 bits (hashbrown's bucket index) fell on as few as 8 700 of 65 536
/// values for about a quarter of the secrets (`distinct_socket_addresses_spread_over_buckets`
/// failed 83 of 300 runs): a bucket pile-up one attacker behind one address could provoke.
#[inline]
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Vector multiply-shift over the words written (see the module's documentation).
pub struct KeyedHasher {
    secrets: &'static Secrets,
    sum: u128,
    words: usize,
    overflow: Option<DefaultHasher>,
}

impl KeyedHasher {
    // Always inlined (as the Hasher methods below): a key's words are written at known
    // positions, so the position checks fold away; called out of line, each word cost a call.
    #[inline(always)]
    fn word(&mut self, x: u64) {
        self.words += 1;
        if self.words <= WORDS {
            let a = self.secrets.a[self.words];
            self.sum = self.sum.wrapping_add(a.wrapping_mul(u128::from(x)));
        } else {
            self.overflow
                .get_or_insert_with(|| self.secrets.fallback.build_hasher())
                .write_u64(x);
        }
    }
}

impl Hasher for KeyedHasher {
    #[inline(always)]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.word(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            // The length in the top byte: a short tail never equals a longer one's word.
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            word[7] = rest.len() as u8;
            self.word(u64::from_le_bytes(word));
        }
    }
    #[inline(always)]
    fn write_u8(&mut self, i: u8) {
        self.word(u64::from(i));
    }
    #[inline(always)]
    fn write_u16(&mut self, i: u16) {
        self.word(u64::from(i));
    }
    #[inline(always)]
    fn write_u32(&mut self, i: u32) {
        self.word(u64::from(i));
    }
    #[inline(always)]
    fn write_u64(&mut self, i: u64) {
        self.word(i);
    }
    #[inline(always)]
    fn write_usize(&mut self, i: usize) {
        self.word(i as u64);
    }
    #[inline(always)]
    fn finish(&self) -> u64 {
        // The word count as one more term keys of different lengths apart.
        let a = self.secrets.a[WORDS];
        let sum = self
            .sum
            .wrapping_add(a.wrapping_mul(u128::from(self.words as u64) << 32));
        let top = mix((sum >> 64) as u64);
        match &self.overflow {
            Some(rest) => top ^ rest.finish(),
            None => top,
        }
    }
}

/// A socket address as a map key, hashed as one word (IPv4: address and port) or three
/// (IPv6: the address's two halves, the port) where `SocketAddr`'s own `Hash` writes four or
/// more (its variant, the address's length, its bytes, the port, and an IPv6 address's flow
/// and scope): the server relay looks its peers up several times per datagram. Equality is
/// `SocketAddr`'s; an IPv6 address's flow label and scope are compared but not hashed, which
/// keeps equal keys' hashes equal (scopes are the host's interfaces, not a sender's choice).
/// Distinct addresses give distinct words, and IPv4 and IPv6 keys differ in their word
/// count, which [`KeyedHasher::finish`] takes in: the family's universality holds for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrKey(pub SocketAddr);

impl Hash for AddrKey {
    #[inline(always)]
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self.0 {
            SocketAddr::V4(a) => {
                state.write_u64((u64::from(a.ip().to_bits()) << 16) | u64::from(a.port()))
            }
            SocketAddr::V6(a) => {
                let ip = a.ip().to_bits();
                state.write_u64((ip >> 64) as u64);
                state.write_u64(ip as u64);
                state.write_u64(u64::from(a.port()));
            }
        }
    }
}

/// One key's hash, for tests and for tables that keep hashes (e.g. a sketch).
pub fn hash_one<T: Hash>(value: &T) -> u64 {
    KeyedState.hash_one(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    #[test]
    fn distinct_socket_addresses_spread_over_buckets() {
        // Every port of one address, as one attacker behind one IP would present them: the low
        // 16 bits (the bucket index of a 65 536-slot table) take nearly as many distinct values
        // as a random function would (about 63% of slots for n = slots).
        let buckets: HashSet<u64> = (0..=u16::MAX)
            .map(|port| hash_one(&SocketAddr::from((Ipv4Addr::LOCALHOST, port))) & 0xffff)
            .collect();
        assert!(buckets.len() > 38_000, "{} buckets", buckets.len());
        // And the top 7 bits (hashbrown's tag) take all 128 values.
        let tags: HashSet<u64> = (0..4096u16)
            .map(|port| hash_one(&SocketAddr::from((Ipv4Addr::LOCALHOST, port))) >> 57)
            .collect();
        assert_eq!(tags.len(), 128);
    }

    #[test]
    fn address_keys_spread_over_buckets_as_socket_addresses_do() {
        for ip in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        ] {
            let key = |port| AddrKey(SocketAddr::new(ip, port));
            let buckets: HashSet<u64> = (0..=u16::MAX)
                .map(|port| hash_one(&key(port)) & 0xffff)
                .collect();
            assert!(buckets.len() > 38_000, "{ip}: {} buckets", buckets.len());
            let tags: HashSet<u64> = (0..4096u16)
                .map(|port| hash_one(&key(port)) >> 57)
                .collect();
            assert_eq!(tags.len(), 128, "{ip}");
        }
        // An IPv4 address, the same as IPv4-mapped IPv6, and its neighbours: all distinct.
        let v4 = Ipv4Addr::new(192, 0, 2, 1);
        let hashes: HashSet<u64> = [
            SocketAddr::from((v4, 123)),
            SocketAddr::from((v4.to_ipv6_mapped(), 123)),
            SocketAddr::from((Ipv4Addr::new(192, 0, 2, 2), 123)),
            SocketAddr::from((v4, 124)),
        ]
        .iter()
        .map(|a| hash_one(&AddrKey(*a)))
        .collect();
        assert_eq!(hashes.len(), 4);
    }

    #[test]
    fn keys_of_every_shape_hash_and_differ() {
        let v4 = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 123));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 123));
        let v6b = SocketAddr::from((Ipv6Addr::LOCALHOST, 124));
        let hashes: HashSet<u64> = [
            hash_one(&v4),
            hash_one(&v6),
            hash_one(&v6b),
            hash_one(&1u64),
        ]
        .into_iter()
        .collect();
        assert_eq!(hashes.len(), 4);
        // Equal keys, equal hashes; a long key (past WORDS words) still works.
        assert_eq!(hash_one(&v6), hash_one(&v6));
        let long = vec![7u64; 40];
        assert_eq!(hash_one(&long), hash_one(&long.clone()));
        let mut other = long.clone();
        other[39] = 8;
        assert_ne!(hash_one(&long), hash_one(&other));
    }

    #[test]
    fn a_map_works_as_a_map() {
        let mut map: KeyedMap<SocketAddr, usize> = keyed_map(0);
        for port in 0..10_000u16 {
            map.insert(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), port as usize);
        }
        for port in 0..10_000u16 {
            assert_eq!(
                map[&SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
                port as usize
            );
        }
    }
}
