#[cfg(test)]
mod fragment_buffer_test;

use crate::content::*;
use crate::handshake::handshake_header::*;
use crate::record_layer::record_layer_header::*;
use shared::error::*;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Cursor};

// 2 mb max buffer size
const FRAGMENT_BUFFER_MAX_SIZE: usize = 2_000_000;
// What a buffered fragment counts against FRAGMENT_BUFFER_MAX_SIZE beyond its data: the
// handshake header it came with and about what keeping it costs, so that empty or one-byte
// fragments cannot be buffered without limit.
const FRAGMENT_OVERHEAD: usize = 64;
// The most fragments one message may be buffered in. A ClientHello or a certificate chain at an
// MTU of 1200 needs a few dozen.
const MAX_FRAGMENTS_PER_MESSAGE: usize = 256;

// The fragments of one handshake message, kept so that it can be reassembled by offset in one
// pass, without re-scanning them for every record.
struct Message {
    // The first fragment's record epoch and handshake header: the reassembled message takes its
    // type, length and sequence number from them.
    epoch: u16,
    handshake_header: HandshakeHeader,
    // Every fragment accepted, in arrival order: (fragment offset, fragment data).
    fragments: Vec<(u32, Vec<u8>)>,
    // [0, covered) is covered by the fragments accepted so far.
    covered: u32,
    // Fragments that begin beyond `covered`: offset -> furthest end among them.
    pending: BTreeMap<u32, u32>,
}

impl Message {
    fn new(epoch: u16, handshake_header: HandshakeHeader) -> Self {
        Message {
            epoch,
            handshake_header,
            fragments: vec![],
            covered: 0,
            pending: BTreeMap::new(),
        }
    }

    fn add(&mut self, offset: u32, data: Vec<u8>) {
        let end = offset + data.len() as u32;
        if offset <= self.covered {
            self.covered = self.covered.max(end);
            // Each pending fragment is taken off once, when the covered prefix reaches it.
            while let Some((&start, &end)) = self.pending.first_key_value() {
                if start > self.covered {
                    break;
                }
                self.covered = self.covered.max(end);
                self.pending.remove(&start);
            }
        } else {
            let furthest = self.pending.entry(offset).or_insert(end);
            *furthest = (*furthest).max(end);
        }
        self.fragments.push((offset, data));
    }

    // Whether a fragment would bring no byte this message lacks: it is empty, or lies within the
    // covered prefix, or within a pending fragment that starts where it does. Such a fragment, a
    // retransmission or a forgery, is not buffered.
    fn adds_nothing(&self, offset: u32, len: usize) -> bool {
        let end = offset + len as u32;
        len == 0
            || end <= self.covered
            || self
                .pending
                .get(&offset)
                .is_some_and(|&furthest| end <= furthest)
    }

    fn is_complete(&self) -> bool {
        self.covered >= self.handshake_header.length
    }

    fn size(&self) -> usize {
        self.fragments
            .iter()
            .map(|(_, data)| data.len() + FRAGMENT_OVERHEAD)
            .sum()
    }

    // Where fragments overlap, the one that arrived first supplies the bytes: they are copied in
    // reverse arrival order, so the earliest is written last.
    fn reassemble(&self) -> Vec<u8> {
        let mut message = vec![0u8; self.handshake_header.length as usize];
        for (offset, data) in self.fragments.iter().rev() {
            let offset = *offset as usize;
            message[offset..offset + data.len()].copy_from_slice(data);
        }
        message
    }
}

pub(crate) struct FragmentBuffer {
    // map of MessageSequenceNumbers that hold the fragments of one message
    cache: HashMap<u16, Message>,

    current_message_sequence_number: u16,

    // What the fragments held in `cache` count (their data plus FRAGMENT_OVERHEAD each), kept up
    // to date as fragments come and go.
    size: usize,
}

impl FragmentBuffer {
    pub fn new() -> Self {
        FragmentBuffer {
            cache: HashMap::new(),
            current_message_sequence_number: 0,
            size: 0,
        }
    }

    /// Whether `push` of a record of `len` bytes would be refused for the buffer's size, the one
    /// check it makes of a record that is not a handshake record (ntp-dtls patch p11).
    pub(crate) fn would_overflow(&self, len: usize) -> bool {
        self.size + len >= FRAGMENT_BUFFER_MAX_SIZE
    }

    // Attempts to push a DTLS packet to the FragmentBuffer
    // when it returns true it means the FragmentBuffer has inserted and the buffer shouldn't be handled
    // when an error returns it is fatal, and the DTLS connection should be stopped
    pub fn push(&mut self, mut buf: &[u8]) -> Result<bool> {
        let current_size = self.size;
        if current_size + buf.len() >= FRAGMENT_BUFFER_MAX_SIZE {
            return Err(Error::ErrFragmentBufferOverflow {
                new_size: current_size + buf.len(),
                max_size: FRAGMENT_BUFFER_MAX_SIZE,
            });
        }

        let mut reader = Cursor::new(buf);
        let record_layer_header = RecordLayerHeader::unmarshal(&mut reader)?;

        // Fragment isn't a handshake, we don't need to handle it
        if record_layer_header.content_type != ContentType::Handshake {
            return Ok(false);
        }

        buf = &buf[RECORD_LAYER_HEADER_SIZE..];
        while !buf.is_empty() {
            let mut reader = Cursor::new(buf);
            let handshake_header = HandshakeHeader::unmarshal(&mut reader)?;

            // end index should be the length of handshake header but if the handshake
            // was fragmented, we should keep them all
            let mut end = HANDSHAKE_HEADER_LENGTH + handshake_header.length as usize;
            if end > buf.len() {
                end = buf.len();
            }

            // Discard all headers, when rebuilding the packet we will re-build
            let data = buf[HANDSHAKE_HEADER_LENGTH..end].to_vec();
            buf = &buf[end..];

            // A fragment reaching past the end of its message cannot be part of it, nor can one
            // that disagrees with the message's first fragment on its type or length.
            let offset = handshake_header.fragment_offset;
            if offset as u64 + data.len() as u64 > handshake_header.length as u64 {
                continue;
            }
            // An empty fragment of a non-empty message brings nothing, not even the message.
            if data.is_empty()
                && handshake_header.length != 0
                && !self.cache.contains_key(&handshake_header.message_sequence)
            {
                continue;
            }
            let message = self
                .cache
                .entry(handshake_header.message_sequence)
                .or_insert_with(|| Message::new(record_layer_header.epoch, handshake_header));
            if handshake_header.handshake_type != message.handshake_header.handshake_type
                || handshake_header.length != message.handshake_header.length
            {
                continue;
            }
            if !message.fragments.is_empty() && message.adds_nothing(offset, data.len()) {
                continue;
            }
            if message.fragments.len() >= MAX_FRAGMENTS_PER_MESSAGE {
                return Err(Error::ErrFragmentBufferOverflow {
                    new_size: message.fragments.len() + 1,
                    max_size: MAX_FRAGMENTS_PER_MESSAGE,
                });
            }

            self.size += data.len() + FRAGMENT_OVERHEAD;
            message.add(offset, data);
        }

        Ok(true)
    }

    pub fn pop(&mut self) -> Result<(Vec<u8>, u16)> {
        let seq_num = self.current_message_sequence_number;
        // ntp-dtls patch i: no handshake has 65 536 messages; refuse the one that would
        // overflow the counter (a remote sender's choice) instead of panicking or wrapping.
        let Some(next_seq_num) = seq_num.checked_add(1) else {
            return Err(Error::ErrEmptyFragment);
        };
        let Some(message) = self.cache.get(&seq_num) else {
            return Err(Error::ErrEmptyFragment);
        };
        if !message.is_complete() {
            return Err(Error::ErrEmptyFragment);
        }

        let raw_message = message.reassemble();

        let mut first_header = message.handshake_header;
        first_header.fragment_offset = 0;
        first_header.fragment_length = first_header.length;

        let mut raw_header = vec![];
        {
            let mut writer = BufWriter::<&mut Vec<u8>>::new(raw_header.as_mut());
            if first_header.marshal(&mut writer).is_err() {
                return Err(Error::ErrEmptyFragment);
            }
        }

        let message_epoch = message.epoch;

        raw_header.extend_from_slice(&raw_message);

        if let Some(message) = self.cache.remove(&seq_num) {
            self.size -= message.size();
        }
        self.current_message_sequence_number = next_seq_num;

        Ok((raw_header, message_epoch))
    }
}
