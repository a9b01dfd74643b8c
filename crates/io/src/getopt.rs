//! A GNU-style `getopt` over one command's words, as qemu-io's commands use it.
//!
//! Observed behaviour reproduced here: short options only; flags may be
//! combined (`-qv`); an option's argument is the rest of the word (`-P0xab`) or
//! the next word whatever it looks like (`-s --`); non-option words are
//! skipped and collected (GNU permutation: `read 0 1 -q` works); `--` ends
//! options; a lone `-` is a positional word; `--x` is the option `-` (invalid).
//! Options are yielded one at a time so callers can validate values in order,
//! exactly when qemu-io does (the first bad option wins).

/// A getopt failure, already in qemu-io's wording (without newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetoptError {
    /// `<cmd>: invalid option -- '<c>'`
    Invalid(char),
    /// `<cmd>: option requires an argument -- '<c>'`
    MissingArgument(char),
}

impl GetoptError {
    /// The stderr line qemu-io prints, `cmd` being the name as typed.
    pub fn message(&self, cmd: &str) -> String {
        match self {
            GetoptError::Invalid(c) => format!("{cmd}: invalid option -- '{c}'"),
            GetoptError::MissingArgument(c) => {
                format!("{cmd}: option requires an argument -- '{c}'")
            }
        }
    }
}

/// Iterator state over the words following the command name.
pub struct Getopt<'a> {
    words: &'a [String],
    spec: &'a str,
    idx: usize,
    /// position inside a cluster word (0 = not inside one)
    pos: usize,
    done: bool,
    /// option words (and their argument words), in order, for the permuted argv
    option_words: Vec<&'a str>,
    saw_double_dash: bool,
    positionals: Vec<&'a str>,
}

impl<'a> Getopt<'a> {
    /// `spec` uses getopt syntax: a letter, followed by `:` if it takes an argument.
    pub fn new(words: &'a [String], spec: &'a str) -> Self {
        Getopt {
            words,
            spec,
            idx: 0,
            pos: 0,
            done: false,
            option_words: Vec::new(),
            saw_double_dash: false,
            positionals: Vec::new(),
        }
    }

    fn takes_arg(&self, c: char) -> Option<bool> {
        if c == ':' {
            return None;
        }
        let mut it = self.spec.chars().peekable();
        while let Some(s) = it.next() {
            let has_arg = it.peek() == Some(&':');
            if has_arg {
                it.next();
            }
            if s == c {
                return Some(has_arg);
            }
        }
        None
    }

    /// Next option: `Some(Ok((letter, argument)))`, `Some(Err(..))`, or `None`
    /// when all words have been consumed.
    pub fn next_opt(&mut self) -> Option<Result<(char, Option<&'a str>), GetoptError>> {
        if self.done {
            return None;
        }
        loop {
            if self.pos == 0 {
                let Some(word) = self.words.get(self.idx) else {
                    self.done = true;
                    return None;
                };
                let word = word.as_str();
                if word == "--" {
                    self.saw_double_dash = true;
                    self.positionals
                        .extend(self.words[self.idx + 1..].iter().map(String::as_str));
                    self.idx = self.words.len();
                    self.done = true;
                    return None;
                }
                if word.len() < 2 || !word.starts_with('-') {
                    self.positionals.push(word);
                    self.idx += 1;
                    continue;
                }
                self.option_words.push(word);
                self.pos = 1;
            }
            let word = self.words[self.idx].as_str();
            let c = word[self.pos..].chars().next().unwrap_or('?');
            self.pos += c.len_utf8();
            let at_end = self.pos >= word.len();
            match self.takes_arg(c) {
                None => {
                    if at_end {
                        self.pos = 0;
                        self.idx += 1;
                    }
                    self.done = true;
                    return Some(Err(GetoptError::Invalid(c)));
                }
                Some(false) => {
                    if at_end {
                        self.pos = 0;
                        self.idx += 1;
                    }
                    return Some(Ok((c, None)));
                }
                Some(true) => {
                    if !at_end {
                        let arg = &word[self.pos..];
                        self.pos = 0;
                        self.idx += 1;
                        return Some(Ok((c, Some(arg))));
                    }
                    self.pos = 0;
                    self.idx += 1;
                    match self.words.get(self.idx) {
                        Some(arg) => {
                            self.idx += 1;
                            self.option_words.push(arg.as_str());
                            return Some(Ok((c, Some(arg.as_str()))));
                        }
                        None => {
                            self.done = true;
                            return Some(Err(GetoptError::MissingArgument(c)));
                        }
                    }
                }
            }
        }
    }

    /// Positional words (valid once `next_opt` returned `None`).
    pub fn positionals(&self) -> &[&'a str] {
        &self.positionals
    }

    /// The first word of the argv as GNU getopt leaves it after permutation:
    /// option words first, then `--` if given, then positionals.
    pub fn permuted_first(&self) -> Option<&'a str> {
        self.option_words
            .first()
            .copied()
            .or(if self.saw_double_dash {
                Some("--")
            } else {
                None
            })
            .or_else(|| self.positionals.first().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split(' ')
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect()
    }

    type Parsed = (
        Vec<(char, Option<String>)>,
        Option<GetoptError>,
        Vec<String>,
    );

    fn run(s: &str, spec: &str) -> Parsed {
        let w = words(s);
        let mut g = Getopt::new(&w, spec);
        let mut opts = Vec::new();
        let mut err = None;
        while let Some(r) = g.next_opt() {
            match r {
                Ok((c, a)) => opts.push((c, a.map(String::from))),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let pos = g.positionals().iter().map(|s| s.to_string()).collect();
        (opts, err, pos)
    }

    #[test]
    fn combined_and_attached() {
        let (o, e, p) = run("-qv 0 1", "bCl:pP:qrs:v");
        assert_eq!(o, vec![('q', None), ('v', None)]);
        assert!(e.is_none());
        assert_eq!(p, vec!["0", "1"]);
        let (o, _, _) = run("-P0xab 0 1", "P:");
        assert_eq!(o, vec![('P', Some("0xab".into()))]);
        let (o, _, _) = run("-qP 0 0 1", "qP:");
        assert_eq!(o, vec![('q', None), ('P', Some("0".into()))]);
        let (o, _, _) = run("-Pv 0 1", "vP:");
        assert_eq!(o, vec![('P', Some("v".into()))]);
    }

    #[test]
    fn permutation_and_double_dash() {
        let (o, _, p) = run("0 1 -q", "q");
        assert_eq!(o, vec![('q', None)]);
        assert_eq!(p, vec!["0", "1"]);
        let (o, _, p) = run("0 -- -1", "q");
        assert!(o.is_empty());
        assert_eq!(p, vec!["0", "-1"]);
        let (_, _, p) = run("- 0 1", "q");
        assert_eq!(p, vec!["-", "0", "1"]);
        let (o, _, p) = run("-P 0 -s -- 0 1", "P:s:");
        assert_eq!(o, vec![('P', Some("0".into())), ('s', Some("--".into()))]);
        assert_eq!(p, vec!["0", "1"]);
    }

    #[test]
    fn errors() {
        let (_, e, _) = run("-x -y 0 1", "q");
        assert_eq!(e.unwrap().message("read"), "read: invalid option -- 'x'");
        let (o, e, _) = run("-qx", "q");
        assert_eq!(o, vec![('q', None)]);
        assert_eq!(e, Some(GetoptError::Invalid('x')));
        let (_, e, _) = run("--x", "q");
        assert_eq!(e, Some(GetoptError::Invalid('-')));
        let (_, e, _) = run("-:", "P:");
        assert_eq!(e, Some(GetoptError::Invalid(':')));
        let (_, e, _) = run("5M -m", "m:");
        assert_eq!(
            e.unwrap().message("truncate"),
            "truncate: option requires an argument -- 'm'"
        );
    }

    #[test]
    fn permuted_first_word() {
        for (s, first) in [
            ("x -m full", "-m"),
            ("-- x", "--"),
            ("-mfull", "-mfull"),
            ("5M x", "5M"),
            ("8M --", "--"),
        ] {
            let w = words(s);
            let mut g = Getopt::new(&w, "m:");
            while let Some(r) = g.next_opt() {
                r.unwrap();
            }
            assert_eq!(g.permuted_first(), Some(first), "{s}");
        }
    }
}
