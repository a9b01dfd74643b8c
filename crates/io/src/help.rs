//! `help` and `help <command>` texts, and the command table they are built from.

/// One row of qemu-io's command table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    pub name: &'static str,
    /// Alternative names (`r` for `read`, ...).
    pub aliases: &'static [&'static str],
    /// Argument synopsis; `None` if none. `map` has `Some("")`, which is why
    /// its line reads `map  -- ...` (two spaces).
    pub args: Option<&'static str>,
    pub oneline: &'static str,
}

const fn args(s: &'static str) -> Option<&'static str> {
    if s.is_empty() { None } else { Some(s) }
}

macro_rules! cmd {
    ($name:literal, [$($alias:literal),*], $args:literal, $oneline:literal) => {
        CommandInfo { name: $name, aliases: &[$($alias),*], args: args($args), oneline: $oneline }
    };
}

/// All commands, in the order `help` lists them.
pub const COMMANDS: &[CommandInfo] = &[
    cmd!("abort", [], "", "simulate a program crash using abort(3)"),
    cmd!(
        "aio_flush",
        [],
        "",
        "completes all outstanding aio requests"
    ),
    cmd!(
        "aio_read",
        [],
        "[-Ciqrv] [-P pattern] off len [len..]",
        "asynchronously reads a number of bytes"
    ),
    cmd!(
        "aio_write",
        [],
        "[-Cfiqruz] [-P pattern] off len [len..]",
        "asynchronously writes a number of bytes"
    ),
    cmd!(
        "alloc",
        ["a"],
        "offset [count]",
        "checks if offset is allocated in the file"
    ),
    cmd!(
        "break",
        [],
        "event tag",
        "sets a breakpoint on event and tags the stopped request as tag"
    ),
    cmd!("close", ["c"], "", "close the current open file"),
    cmd!(
        "discard",
        ["d"],
        "[-Cq] off len",
        "discards a number of bytes at a specified offset"
    ),
    cmd!("flush", ["f"], "", "flush all in-core file state to disk"),
    cmd!("help", ["?"], "[command]", "help for one or all commands"),
    cmd!(
        "info",
        ["i"],
        "",
        "prints information about the current file"
    ),
    cmd!("length", ["l"], "", "gets the length of the current file"),
    CommandInfo {
        name: "map",
        aliases: &[],
        args: Some(""),
        oneline: "prints the allocated areas of a file",
    },
    cmd!(
        "open",
        ["o"],
        "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
        "open the file specified by path"
    ),
    cmd!("quit", ["q"], "", "exit the program"),
    cmd!(
        "read",
        ["r"],
        "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
        "reads a number of bytes at a specified offset"
    ),
    cmd!(
        "readv",
        [],
        "[-Cqrv] [-P pattern] off len [len..]",
        "reads a number of bytes at a specified offset"
    ),
    cmd!("remove_break", [], "tag", "remove a breakpoint by tag"),
    cmd!(
        "reopen",
        [],
        "[(-r|-w)] [-c cache] [-o options]",
        "reopens an image with new options"
    ),
    cmd!("resume", [], "tag", "resumes the request tagged as tag"),
    cmd!("sigraise", [], "signal", "raises a signal"),
    cmd!("sleep", [], "", "waits for the given value in milliseconds"),
    cmd!(
        "truncate",
        ["t"],
        "[-m prealloc_mode] off",
        "truncates the current file at the given offset"
    ),
    cmd!(
        "wait_break",
        [],
        "tag",
        "waits for the suspension of a request"
    ),
    cmd!(
        "write",
        ["w"],
        "[-bcCfnqruz] [-P pattern | -s source_file] off len",
        "writes a number of bytes at a specified offset"
    ),
    cmd!(
        "writev",
        [],
        "[-Cfqr] [-P pattern] off len [len..]",
        "writes a number of bytes at a specified offset"
    ),
    cmd!(
        "zone_append",
        ["zap"],
        "offset len [len..]",
        "append write a number of bytes at a specified offset"
    ),
    cmd!(
        "zone_close",
        ["zc"],
        "offset len",
        "close a range of zones in zone block device"
    ),
    cmd!(
        "zone_finish",
        ["zf"],
        "offset len",
        "finish a range of zones in zone block device"
    ),
    cmd!(
        "zone_open",
        ["zo"],
        "offset len",
        "explicit open a range of zones in zone block device"
    ),
    cmd!(
        "zone_report",
        ["zrp"],
        "offset number",
        "report zone information"
    ),
    cmd!(
        "zone_reset",
        ["zrs"],
        "offset len",
        "reset a zone write pointer in zone block device"
    ),
];

/// Find a command by name or alias (case-sensitive).
pub fn lookup(name: &str) -> Option<&'static CommandInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.aliases.contains(&name))
}

/// `<name> <args> -- <oneline>` (or `<name> -- <oneline>` without args), no newline.
pub fn oneline(info: &CommandInfo, shown_name: &str) -> String {
    match info.args {
        None => format!("{shown_name} -- {}", info.oneline),
        Some(args) => format!("{shown_name} {args} -- {}", info.oneline),
    }
}

/// The usage line printed (stdout) after a getopt error or a wrong number of
/// positional arguments; always uses the canonical name.
pub fn usage(info: &CommandInfo) -> String {
    format!("{}\n", oneline(info, info.name))
}

/// Extended help text (printed after the one-line form and an empty line).
pub fn extended(name: &str) -> Option<&'static str> {
    match name {
        "aio_read" => Some(
            r#" asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -i, -- treat request as invalid, for exercising stats
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

"#,
        ),
        "aio_write" => Some(
            r#" asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

"#,
        ),
        "discard" => Some(
            r#" discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

"#,
        ),
        "open" => Some(
            r#" opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
"#,
        ),
        "read" => Some(
            r#" reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

"#,
        ),
        "readv" => Some(
            r#" reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

"#,
        ),
        "reopen" => Some(
            r#" Changes the open options of an already opened image

 Example:
 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image

 -r, -- Reopen the image read-only
 -w, -- Reopen the image read-write
 -c, -- Change the cache mode to the given value
 -o, -- Changes block driver options (cf. 'open' command)

"#,
        ),
        "sigraise" => Some(
            r#" raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where "signal" is the mandatory integer argument
 given to sigraise.

"#,
        ),
        "write" => Some(
            r#" writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

"#,
        ),
        "writev" => Some(
            r#" writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer

"#,
        ),
        _ => None,
    }
}

/// `help` without argument: the whole table, an empty line, the hint.
pub fn help_all() -> String {
    let mut s = String::new();
    for c in COMMANDS {
        s.push_str(&oneline(c, c.name));
        s.push('\n');
    }
    s.push_str("\nUse 'help commandname' for extended help.\n");
    s
}

/// `help <topic>`: `Ok(stdout text)`, or `Err(stdout text)` (rc 1) for an
/// unknown command: `command <topic> not found` (no quotes, stdout).
pub fn help_topic(topic: &str) -> Result<String, String> {
    let Some(info) = lookup(topic) else {
        return Err(format!("command {topic} not found\n"));
    };
    let mut s = oneline(info, topic);
    s.push('\n');
    if let Some(ext) = extended(info.name) {
        s.push('\n');
        s.push_str(ext);
    }
    Ok(s)
}

/// Output of the `help` command.
pub fn help(topic: Option<&str>) -> Result<String, String> {
    match topic {
        None => Ok(help_all()),
        Some(t) => help_topic(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
abort -- simulate a program crash using abort(3)
aio_flush -- completes all outstanding aio requests
aio_read [-Ciqrv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes
aio_write [-Cfiqruz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes
alloc offset [count] -- checks if offset is allocated in the file
break event tag -- sets a breakpoint on event and tags the stopped request as tag
close -- close the current open file
discard [-Cq] off len -- discards a number of bytes at a specified offset
flush -- flush all in-core file state to disk
help [command] -- help for one or all commands
info -- prints information about the current file
length -- gets the length of the current file
map  -- prints the allocated areas of a file
open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path
quit -- exit the program
read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset
readv [-Cqrv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset
remove_break tag -- remove a breakpoint by tag
reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options
resume tag -- resumes the request tagged as tag
sigraise signal -- raises a signal
sleep -- waits for the given value in milliseconds
truncate [-m prealloc_mode] off -- truncates the current file at the given offset
wait_break tag -- waits for the suspension of a request
write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset
writev [-Cfqr] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset
zone_append offset len [len..] -- append write a number of bytes at a specified offset
zone_close offset len -- close a range of zones in zone block device
zone_finish offset len -- finish a range of zones in zone block device
zone_open offset len -- explicit open a range of zones in zone block device
zone_report offset number -- report zone information
zone_reset offset len -- reset a zone write pointer in zone block device

Use 'help commandname' for extended help.
";

    #[test]
    fn whole_table() {
        assert_eq!(help_all(), TABLE);
        assert_eq!(help(None).unwrap(), TABLE);
    }

    #[test]
    fn one_liners() {
        for line in TABLE.lines().take(COMMANDS.len()) {
            let name = line.split(' ').next().unwrap();
            let expected = format!("{line}\n");
            let got = help_topic(name).unwrap();
            if extended(name).is_none() {
                assert_eq!(got, expected);
            } else {
                assert!(got.starts_with(&format!("{expected}\n")), "{name}");
            }
        }
    }

    #[test]
    fn aliases() {
        assert_eq!(
            help_topic("r").unwrap().lines().next().unwrap(),
            "r [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset"
        );
        assert_eq!(help_topic("q").unwrap(), "q -- exit the program\n");
        assert_eq!(
            help_topic("?").unwrap(),
            "? [command] -- help for one or all commands\n"
        );
        assert_eq!(
            help_topic("zap").unwrap(),
            "zap offset len [len..] -- append write a number of bytes at a specified offset\n"
        );
        for (alias, name) in [
            ("r", "read"),
            ("w", "write"),
            ("a", "alloc"),
            ("c", "close"),
            ("d", "discard"),
            ("f", "flush"),
            ("i", "info"),
            ("l", "length"),
            ("o", "open"),
            ("q", "quit"),
            ("t", "truncate"),
            ("?", "help"),
            ("zrp", "zone_report"),
            ("zo", "zone_open"),
            ("zc", "zone_close"),
            ("zf", "zone_finish"),
            ("zrs", "zone_reset"),
            ("zap", "zone_append"),
        ] {
            assert_eq!(lookup(alias).unwrap().name, name);
        }
        assert!(lookup("exit").is_none());
        assert!(lookup("READ").is_none());
    }

    #[test]
    fn unknown_topic() {
        assert_eq!(
            help_topic("bogus"),
            Err("command bogus not found\n".to_string())
        );
    }

    #[test]
    fn extended_texts() {
        assert_eq!(
            help_topic("discard").unwrap(),
            "discard [-Cq] off len -- discards a number of bytes at a specified offset\n\
             \n \
             discards a range of bytes from the given offset\n\
             \n \
             Example:\n \
             'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file\n\
             \n \
             Discards a segment of the currently open file.\n \
             -C, -- report statistics in a machine parsable format\n \
             -q, -- quiet mode, do not show I/O statistics\n\n"
        );
        let open = help_topic("open").unwrap();
        assert!(open.ends_with(" -o, -- options to be given to the block driver\n"));
        assert!(!open.ends_with("\n\n"));
        let read = help_topic("read").unwrap();
        assert!(read.ends_with(" -v, -- dump buffer to standard output\n\n"));
        assert!(read.contains(
            "\n 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file\n"
        ));
        assert!(
            help_topic("aio_read")
                .unwrap()
                .contains(" 'aio_read -v 512 1k 1k ' - dumps")
        );
        assert!(
            help_topic("sigraise")
                .unwrap()
                .ends_with("\n given to sigraise.\n\n")
        );
        for n in [
            "aio_read",
            "aio_write",
            "discard",
            "read",
            "readv",
            "reopen",
            "sigraise",
            "write",
            "writev",
        ] {
            assert!(help_topic(n).unwrap().ends_with("\n\n"), "{n}");
        }
    }

    #[test]
    fn usage_uses_canonical_name() {
        assert_eq!(
            usage(lookup("r").unwrap()),
            "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset\n"
        );
    }
}
