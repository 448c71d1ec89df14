//! Streaming text assembly for generated tokens: UTF-8 reassembly across token boundaries and stop-string holdback.

/// Reassembles UTF-8 text from token byte pieces that may split multibyte characters.
///
/// `push` returns only complete, valid text; an incomplete trailing sequence (at most 3 bytes) is
/// held until the next piece. Invalid byte sequences become U+FFFD, never a panic.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Appends `bytes` and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // `valid` bytes were just validated by from_utf8.
                    if let Ok(s) = std::str::from_utf8(&self.pending[start..start + valid]) {
                        out.push_str(s);
                    }
                    start += valid;
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            start += n;
                        }
                        None => break, // incomplete sequence at the end: wait for more bytes
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Flushes whatever is held (an incomplete sequence becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Result of feeding text through a [`StopBuffer`].
#[derive(Debug, PartialEq, Eq)]
pub struct StopStep {
    /// Text that can be sent to the client now.
    pub emit: String,
    /// A stop string matched; generation must end and nothing after `emit` is shown.
    pub stopped: bool,
}

/// Holds back text that might be the beginning of a stop string, and cuts the output at the first
/// complete stop string (which is itself not shown).
#[derive(Debug, Default)]
pub struct StopBuffer {
    stops: Vec<String>,
    max_len: usize,
    held: String,
}

impl StopBuffer {
    /// Creates a buffer for the given stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            max_len,
            held: String::new(),
        }
    }

    /// Feeds new text; returns what may be emitted and whether a stop string matched.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stops.is_empty() {
            return StopStep {
                emit: text.to_owned(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let emit = self.held[..at].to_owned();
            self.held.clear();
            return StopStep {
                emit,
                stopped: true,
            };
        }
        let keep = self.holdback();
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopStep {
            emit,
            stopped: false,
        }
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop string.
    fn holdback(&self) -> usize {
        let len = self.held.len();
        let upper = self.max_len.saturating_sub(1).min(len);
        for k in (1..=upper).rev() {
            let start = len - k;
            if !self.held.is_char_boundary(start) {
                continue;
            }
            let tail = &self.held[start..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                return k;
            }
        }
        0
    }

    /// Releases the held text at the end of generation (no stop string matched).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes currently held back.
    #[cfg(test)]
    pub fn held_len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_multibyte_is_buffered() {
        let s = "héllo 🦀!".as_bytes();
        let mut u = Utf8Stream::default();
        let mut out = String::new();
        for b in s {
            let piece = u.push(std::slice::from_ref(b));
            assert!(std::str::from_utf8(piece.as_bytes()).is_ok());
            out.push_str(&piece);
        }
        out.push_str(&u.finish());
        assert_eq!(out, "héllo 🦀!");
    }

    #[test]
    fn utf8_invalid_bytes_become_replacement() {
        let mut u = Utf8Stream::default();
        assert_eq!(u.push(&[b'a', 0xff, b'b']), "a\u{FFFD}b");
        assert_eq!(u.push(&[0xe2, 0x82]), "");
        assert_eq!(u.finish(), "\u{FFFD}");
    }

    #[test]
    fn stop_string_across_pieces_is_trimmed() {
        let mut sb = StopBuffer::new(&["END".to_owned()]);
        let mut out = String::new();
        let mut stopped = false;
        for piece in ["hello E", "N", "D tail"] {
            let step = sb.push(piece);
            out.push_str(&step.emit);
            if step.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "hello ");
    }

    #[test]
    fn false_stop_prefix_is_released() {
        let mut sb = StopBuffer::new(&["END".to_owned()]);
        let a = sb.push("hello EN");
        assert_eq!(a.emit, "hello ");
        assert_eq!(sb.held_len(), 2);
        let b = sb.push("x");
        assert_eq!(b.emit, "ENx");
        assert!(!b.stopped);
        assert_eq!(sb.finish(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut sb = StopBuffer::new(&["bb".to_owned(), "a".to_owned()]);
        let step = sb.push("xxbbya");
        assert!(step.stopped);
        assert_eq!(step.emit, "xx");
    }

    #[test]
    fn no_stops_passes_through() {
        let mut sb = StopBuffer::new(&[]);
        assert_eq!(sb.push("abc").emit, "abc");
    }

    #[test]
    fn multibyte_stop_holdback_respects_char_boundaries() {
        let mut sb = StopBuffer::new(&["é!".to_owned()]);
        let step = sb.push("café");
        assert_eq!(step.emit, "caf");
        let step = sb.push("!");
        assert!(step.stopped);
        assert_eq!(step.emit, "");
    }
}
