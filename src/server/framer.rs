//! Line framing: a byte stream split into lines of bounded length, lent out
//! of the read buffer in place.

use bytes::{Buf, BytesMut};

/// One framed piece of input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'b> {
    /// A complete line, without `\n` (a trailing `\r` is left for the parser,
    /// which treats it as whitespace), borrowed from the read buffer.
    Line(&'b [u8]),
    /// A line longer than the limit; its bytes are discarded up to the next `\n`.
    TooLong,
}

/// Splits a byte stream into lines of bounded length. Memory stays bounded by the
/// limit even for an endless line: once a line is known to be too long, its bytes
/// are dropped as they arrive.
///
/// Lines are lent out of the buffer in place; [`Framer::consume`] then drops
/// all that has been framed at once, so a read's worth of lines costs no copy
/// and no bookkeeping per line.
pub(crate) struct Framer {
    max_line: usize,
    /// Where the next line starts in the buffer: everything before is framed.
    start: usize,
    /// How far past `start` the buffer has been searched for `\n` without finding one.
    scanned: usize,
    /// Inside a too-long line: drop bytes until its end.
    discarding: bool,
}

impl Framer {
    pub(crate) fn new(max_line: usize) -> Self {
        Self {
            max_line,
            start: 0,
            scanned: 0,
            discarding: false,
        }
    }

    /// The next complete frame in `buf`, if any.
    pub(crate) fn next<'b>(&mut self, buf: &'b [u8]) -> Option<Frame<'b>> {
        if self.discarding {
            match memchr::memchr(b'\n', &buf[self.start..]) {
                Some(i) => {
                    self.start += i + 1;
                    self.discarding = false;
                }
                None => {
                    self.start = buf.len();
                    return None;
                }
            }
        }
        let rest = &buf[self.start..];
        match memchr::memchr(b'\n', &rest[self.scanned..]) {
            Some(i) => {
                let end = self.scanned + i;
                self.start += end + 1;
                self.scanned = 0;
                Some(self.check(&rest[..end]))
            }
            None => {
                self.scanned = rest.len();
                // One byte of slack: the line's `\r` may be all that is missing.
                if rest.len() > self.max_line + 1 {
                    self.start = buf.len();
                    self.scanned = 0;
                    self.discarding = true;
                    Some(Frame::TooLong)
                } else {
                    None
                }
            }
        }
    }

    /// At end of input: the unterminated last line, if any.
    pub(crate) fn rest<'b>(&mut self, buf: &'b [u8]) -> Option<Frame<'b>> {
        let rest = &buf[self.start..];
        self.start = buf.len();
        self.scanned = 0;
        if self.discarding || rest.is_empty() {
            return None;
        }
        Some(self.check(rest))
    }

    /// Drops what has been framed from the front of `buf`; the lines lent out
    /// must be done with.
    pub(crate) fn consume(&mut self, buf: &mut BytesMut) {
        buf.advance(self.start);
        self.start = 0;
    }

    fn check<'b>(&self, line: &'b [u8]) -> Frame<'b> {
        let len = line.len() - usize::from(line.last() == Some(&b'\r'));
        if len > self.max_line {
            Frame::TooLong
        } else {
            Frame::Line(line)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `input`, frames what it can, and drops the framed bytes.
    fn frames(framer: &mut Framer, buf: &mut BytesMut, input: &[u8]) -> Vec<String> {
        buf.extend_from_slice(input);
        let framed = std::iter::from_fn(|| framer.next(buf).map(show)).collect();
        framer.consume(buf);
        framed
    }

    fn show(frame: Frame) -> String {
        match frame {
            Frame::Line(line) => String::from_utf8_lossy(line).into_owned(),
            Frame::TooLong => "(too long)".to_string(),
        }
    }

    fn line(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn lines_split_on_newline_across_reads() {
        let mut f = Framer::new(16);
        let mut buf = BytesMut::new();
        assert_eq!(
            frames(&mut f, &mut buf, b"PING\r\nGET a"),
            vec![line("PING\r")]
        );
        assert_eq!(frames(&mut f, &mut buf, b" b\nPI"), vec![line("GET a b")]);
        assert_eq!(
            frames(&mut f, &mut buf, b"NG\n\n"),
            vec![line("PING"), line("")]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn a_line_at_the_limit_passes_and_one_byte_more_does_not() {
        let mut f = Framer::new(4);
        let mut buf = BytesMut::new();
        assert_eq!(frames(&mut f, &mut buf, b"abcd\r\n"), vec![line("abcd\r")]);
        assert_eq!(frames(&mut f, &mut buf, b"abcd\n"), vec![line("abcd")]);
        assert_eq!(
            frames(&mut f, &mut buf, b"abcde\n"),
            vec![show(Frame::TooLong)]
        );
        assert_eq!(
            frames(&mut f, &mut buf, b"abcde\r\nPING\n"),
            vec![show(Frame::TooLong), line("PING")]
        );
    }

    #[test]
    fn an_endless_line_is_dropped_as_it_arrives() {
        let mut f = Framer::new(8);
        let mut buf = BytesMut::new();
        assert_eq!(
            frames(&mut f, &mut buf, b"0123456789"),
            vec![show(Frame::TooLong)]
        );
        for _ in 0..1000 {
            assert!(frames(&mut f, &mut buf, &[b'x'; 100]).is_empty());
            assert!(buf.len() <= 100);
        }
        assert_eq!(frames(&mut f, &mut buf, b"xx\nPING\n"), vec![line("PING")]);
    }

    #[test]
    fn the_unterminated_last_line_is_still_a_line() {
        let mut f = Framer::new(8);
        let mut buf = BytesMut::new();
        assert_eq!(frames(&mut f, &mut buf, b"PING\nQUIT"), vec![line("PING")]);
        assert_eq!(f.rest(&buf).map(show), Some(line("QUIT")));
        f.consume(&mut buf);
        assert_eq!(f.rest(&buf), None);
    }
}
