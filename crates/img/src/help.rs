//! qemu-img's help texts (docs/reference/qemu-io-behaviour.md, Appendix B).

pub const VERSION: &str = "qemu-img version 10.0.2 (blockd-img 0.1.0)\n\
Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";

pub const MAIN: &str = "\
qemu-img version 10.0.2 (blockd-img 0.1.0)
Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers
QEMU disk image utility.  Usage:

  qemu-img [standard options] COMMAND [--help | command options]

Standard options:
  -h, --help
     display this help and exit
  -V, --version
     display version info and exit

Recognized commands (run qemu-img COMMAND --help for command-specific help):

  bench - Run simple image benchmark
  check - Check basic image integrity
  commit - Commit image to its backing file
  compare - Check if two images have the same contents
  convert - Copy one image to another with optional format conversion
  create - Create and format new image file
  dd - Copy input to output with optional format conversion
  info - Display information about image
  map - Dump image metadata
  measure - Calculate file size requred for a new image
  rebase - Change backing file of the image
  resize - Resize the image to the new size

Supported image formats:

  file host_device nbd null-aio null-co qcow2 raw
";

pub const BENCH: &str = "\
Usage:
Run simple image benchmark.  Usage:

  qemu-img bench [-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]
        [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n]
        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  -c, --count COUNT
     number of I/O requests to perform
  -s, --buffer-size BUFFER_SIZE
     size of each I/O request
  -d, --depth DEPTH
     number of requests to perform in parallel
  -o, --offset OFFSET
     start first request at this OFFSET
  -S, --step-size STEP_SIZE
     each next request offset increment
  -i, --aio AIO
     async-io backend (threads, native, io_uring)
  -n, --native
     use native AIO backend if possible
  -w, --write
     perform write test (default is read)
  --pattern PATTERN
     write this pattern byte instead of zero
  --flush-interval FLUSH_INTERVAL
     issue flush after this number of requests
  --no-drain
     do not wait when flushing pending requests
  -U, --force-share
     open images in shared mode for concurrent access

";

pub const CREATE: &str = "\
Usage:
Create and format new image file.  Usage:

  qemu-img create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]]
        [--object OBJDEF] [-u] FILENAME [SIZE[bkKMGTPE]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the new image, default is raw
  -o, --options FMT_OPTS
     format-specific options ('-o list' for list)
  -b, --backing BACKING_FILENAME
     stack new image on top of BACKING_FILENAME
     (for formats which support stacking)
  -F, --backing-format BACKING_FMT
     specify format of BACKING_FILENAME
  -u, --backing-unsafe
     do not fail if BACKING_FMT can not be read
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file to create.  It will be overridden if exists
  SIZE
     image size with optional suffix (multiplies in 1024)
     SIZE is required unless BACKING_IMG is specified,
     in which case it will be the same as size of BACKING_IMG

";

pub const INFO: &str = "\
Usage:
Display information about image.  Usage:

  qemu-img info [-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]
        [--output human|json] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -b, --backing-chain
     display information about backing chaing
  (in case the image is stacked
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  --output human|json
     specify output format name (default human)
  FILENAME
     image file name (or specification with --image-opts)

";

pub const CONVERT: &str = "\
Usage:
Copy one image to another with optional format conversion.  Usage:

  qemu-img convert [-f SRC_FMT|--image-opts] [-T SRC_CACHE] [--bitmaps [--skip-broken-bitmaps]]
        [-o TGT_OPTS|--target-image-opts] [-t TGT_CACHE] [-n]
        [-B BACKING_FILENAME [-F BACKING_FMT]]
        SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --source-format SRC_FMT
     specify SRC_FILENAME source image format explicitly
  --source-image-opts
     indicates that SRC_FILENAME is a complete image specification
     instead of a file name (incompatible with --source-format)
  -l, --source-snapshot SNAPSHOT_PARAMS
     specify source snapshot parameters
  -T, --source-cache SRC_CACHE
     source image(s) cache mode (writeback)
  -O, --target-format TGT_FMT
     specify TGT_FILENAME image format (default is raw)
  --target-image-opts
     indicates that TGT_FILENAME is a complete image specification
     instead of a file name (incompatible with --output-format)
  -o, --target-options TGT_OPTS
     TARGET_FMT-specific options
  -c, --compress
     create compressed output image (qcow and qcow2 format only)
  -t, --target-cache TGT_CACHE
     cache mode when opening output image (unsafe)
  -B, --backing BACKING_FILENAME
     create output to be a CoW on top of BACKING_FILENAME
  -F, --backing-format BACKING_FMT
     specify BACKING_FILENAME image format explicitly
  -n, --no-create
     omit target volume creation (eg on rbd)
  --target-is-zero
  -S, --sparse-size SPARSE_SIZE
     XXX todo
  --bitmaps
     also copy any persistent bitmaps present in source
  --skip-broken-bitmaps
     skip (do not error out) any broken bitmaps
  -U, --force-share
     open images in shared mode for concurrent access
  -r, --rate RATE
     I/O rate limit
  -m, --parallel NUM_COROUTINES
     specify parallelism (default 8)
  -C, --copy-range-offloading
     use copy_range offloading
  --salvage
     XXX todo
  -W, --oob-writes
     enable out-of-order writes to improve performance
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  SRC_FILENAME
     source image file name (or specification with --image-opts)
  TGT_FILENAME
     target (output) image file name

";

/// The formats QEMU 10.0.2 knows (qemu-img's "Supported image formats"): naming another one
/// is "Unknown file format"; naming one of these that blockd lacks is "not supported yet".
pub const KNOWN_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

pub const MAP: &str = "\
Usage:
Dump image metadata.  Usage:

  qemu-img map [-f FMT | --image-opts] [--object OBJDEF] [--output human|json]
        [--start-offset OFFSET] [--max-length LENGTH] [-U] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --start-offset OFFSET
  --max-length LENGTH
  --output human|json
     specify output format name (default human)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

";

pub const COMPARE: &str = "\
Usage:
Check if two images have the same contents.  Usage:

  qemu-img compare [--image-opts | [-f FMT] [-F FMT]] [-s]
        [-T CACHE] [-U] [--object OBJDEF] FILENAME1 FILENAME2

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show operation progress
  -f, --a-format FMT
     specify FILENAME1 image format explicitly
  -F, --b-format FMT
     specify FILENAME2 image format explicitly
  --image-opts
     indicates that FILENAMEs are complete image specifications
     instead of file names (incompatible with --a-format and --b-format)
  -s, --strict
     strict mode, also check if sizes are equal
  -T, --cache CACHE_MODE
     images caching mode (writeback)
  -U, --force-share
     open images in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME1, FILENAME2
     image files (or specifications) to compare

";

pub const RESIZE: &str = "\
Usage:
Resize the image to the new size.  Usage:

  qemu-img resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink]
        [--object OBJECTDEF] [-q] FILENAME [+-]SIZE[bkKMGTPE]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  --shrink
     allow operation when new size is smaller than original
  --preallocation PREALLOC
     specify preallocation type for the new areas
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file (specification) to resize
  [+-]SIZE[bkKMGTPE]
     new image size or amount by which to shrink/grow,
     with optional suffix (1024-based multiplies)

";

pub const DD: &str = "\
Usage:
Copy input to output with optional format conversion.  Usage:

  qemu-img dd [-f FMT|--image-opts] [-O OUTPUT_FMT] [-U]
        [bs=BLOCK_SIZE] [count=BLOCKS] if=INPUT of=OUTPUT

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify format for INPUT explicitly
  --image-opts
     indicates that INPUT is a complete image specification
     instead of a file name (incompatible with --format)
  -O, --output-format OUTPUT_FMT
     format of the OUTPUT (default raw)
  -U, --force-share
     open images in shared mode for concurrent access
  bs=BLOCK_SIZE[kKMGTP]
     size of I/O block (default 512)
  count=COUNT
     number of blocks to convert (default whole INPUT)
  if=INPUT
     input file name (or image specification with --image-opts)
  of=OUTPUT
     output file name to create

";

pub const MEASURE: &str = "\
Usage:
Calculate file size requred for a new image.  Usage:

  qemu-img measure [-f FMT|--image-opts] [-o OPTIONS] [-O OUTPUT_FMT]
       [--output OFMT] [--object OBJDEF] [-l SNAPSHOT_PARAM]
       (--size SIZE | FILENAME)

Arguments:
  -h, --help
     print this help and exit
  -O, --target-format FMT
     desired target/output image format (default raw)
  -s, --size SIZE
     measure file size for given image size
  FILENAME
     measure file size required to convert from FILENAME
  -f, --format
     specify format of FILENAME explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -l, --snapshot SNAPSHOT
     use this snapshot in FILENAME as source
  --output human|json
     output format
  -U, --force-share
     open images in shared mode for concurrent access

";

pub const REBASE: &str = "\
Usage:
Change backing file of the image.  Usage:

  qemu-img rebase [-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p]
        [-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u]
        [--object OBJDEF] [-c] FILENAME
Rebases FILENAME on top of BACKING_FILENAME or no backing file

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show progress indicator
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  -b, --backing BACKING_FILENAME|\"\"
     rebase onto this file (or no backing file)
  -F, --backing-format BACKING_FMT
     specify format for BACKING_FILENAME
  -T, --backing-cache CACHE
     BACKING_FILENAME cache mode (writeback)
  -u, --backing-unsafe
     do not fail if BACKING_FILENAME can not be read
  -c, --compress
     compress image (when image supports this)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

";

pub const COMMIT: &str = "\
Usage:
Commit image to its backing file.  Usage:

  qemu-img commit [-f FMT | --image-opts] [-t CACHE_MODE] [-b BASE_IMG] [-d]
        [-r RATE] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -t, --cache CACHE_MODE image cache mode (writeback)
  -d, --drop
     skip emptying FILENAME on completion
  -b, --base BASE_IMG
     image in the backing chain to which to commit changes
     instead of the previous one (implies --drop)
  -r, --rate RATE
     I/O rate limit
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     name of the image file to operate on

";

/// `-o help` for qcow2 without a file name (the format's options).
pub const QCOW2_FORMAT_HELP: &str = "\
Supported qcow2 options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm
  encrypt.cipher-mode=<str> - Name of encryption cipher mode
  encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'
  encrypt.hash-alg=<str> - Name of encryption hash algorithm
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.ivgen-alg=<str> - Name of IV generator algorithm
  encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm
  encrypt.key-secret=<str> - ID of secret providing qcow AES key or LUKS passphrase
  encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size

The protocol level may support further options.
Specify the target filename to include those options.
";

/// `-o help` for qcow2 with a file name (the format's and the file protocol's options).
pub const QCOW2_OPTION_HELP: &str = "\
Supported options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.cipher-alg=<str> - Name of encryption cipher algorithm
  encrypt.cipher-mode=<str> - Name of encryption cipher mode
  encrypt.format=<str>   - Encrypt the image, format choices: 'aes', 'luks'
  encrypt.hash-alg=<str> - Name of encryption hash algorithm
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.ivgen-alg=<str> - Name of IV generator algorithm
  encrypt.ivgen-hash-alg=<str> - Name of IV generator hash algorithm
  encrypt.key-secret=<str> - ID of secret providing qcow AES key or LUKS passphrase
  encryption=<bool (on/off)> - Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)
  extended_l2=<bool (on/off)> - Extended L2 tables
  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

pub const AMEND: &str = "\
Usage:
Update format-specific options of the image.  Usage:

  qemu-img amend [-f FMT | --image-opts] [t CACHE] [--force] [-p] [-q]
        [--object OBJDEF -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progres
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations

";
