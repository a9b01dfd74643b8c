//! qcow2 images with an external data file, blockd-img against qemu-img 10 in identically
//! prepared directories: `create -o data_file=...,data_file_raw=...` (the image and the data
//! file byte for byte, errors), `info` (text and JSON), `map` (human, with the data file's
//! name, and JSON), `check` (text, JSON, `-r`), `convert -O qcow2 -o data_file=...`, `amend`
//! of data_file/data_file_raw, `measure`, `snapshot -c` (refused), `resize`, and what images
//! with broken data file settings give.

mod common;

use std::path::Path;

use common::*;

/// Images qemu-img made with data files, filled by qemu-io: a plain data file, a raw one,
/// one with extended L2 and small clusters, a source raw image for convert, and broken ones
/// (the data file bit without a name, the raw bit without the data file bit, names that are
/// protocol specifications, a compressed cluster in a data file image).
fn prepare(d: &Path) {
    image(
        d,
        "src.raw",
        3 << 20,
        &[
            (0, 5, 100 << 10),
            (1 << 20, 6, 64 << 10),
            (2_900_000, 7, 10_000),
        ],
    );
    for c in [
        "create -q -f qcow2 -o data_file=d.raw plain.qcow2 4M",
        "create -q -f qcow2 -o data_file=r.raw,data_file_raw=on raw.qcow2 4M",
        "create -q -f qcow2 -o data_file=x.raw,extended_l2=on,cluster_size=16k xl2.qcow2 2M",
        "create -q -f qcow2 -o data_file=n.raw noname.qcow2 1M",
        "create -q -f qcow2 -o data_file=j.raw json.qcow2 1M",
        "create -q -f qcow2 -o data_file=c.raw comp.qcow2 1M",
        "create -q -f qcow2 nodata.qcow2 1M",
        "create -q -f qcow2 rawbit.qcow2 1M",
        "create -q -f qcow2 base.qcow2 2M",
        "create -q -f qcow2 -b base.qcow2 -F qcow2 -o data_file=t.raw top.qcow2",
    ] {
        qemu(QEMU_IMG, c, d);
    }
    qemu_io(
        d,
        "plain.qcow2",
        &[
            "write -P 1 64k 64k",
            "write -P 2 1M 4k",
            "write -z 2M 64k",
            "write -P 3 3M 128k",
            "write -z -u 3M 64k",
            "discard 3200k 64k",
        ],
    );
    qemu_io(
        d,
        "raw.qcow2",
        &[
            "write -P 1 0 128k",
            "write -z 0 64k",
            "write -P 4 1000000 300000",
            "discard 2M 128k",
            "write -z -u 3M 64k",
        ],
    );
    qemu_io(
        d,
        "xl2.qcow2",
        &["write -P 7 2k 2k", "write -z 64k 4k", "write -P 8 1M 100k"],
    );
    qemu_io(d, "comp.qcow2", &["write -P 9 0 64k"]);
    qemu_io(d, "top.qcow2", &["write -P 3 0 100k", "write -P 4 1M 64k"]);
    // Header surgery (QEMU's tools refuse to make these).
    patch(d, "noname.qcow2", |f| remove_extension(f, 0x4441_5441));
    patch(d, "json.qcow2", |f| {
        replace_extension(
            f,
            0x4441_5441,
            b"json:{\"driver\":\"file\",\"filename\":\"/etc/passwd\"}",
        )
    });
    patch(d, "rawbit.qcow2", |f| {
        f[88..96].copy_from_slice(&2u64.to_be_bytes())
    });
    patch(d, "comp.qcow2", |f| {
        // Guest cluster 0 becomes a compressed descriptor.
        let l1 = be64(f, 40) as usize;
        let l2 = (be64(f, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        let desc: u64 = (1 << 62) | (3 << 54) | 0x50000;
        f[l2..l2 + 8].copy_from_slice(&desc.to_be_bytes());
    });
    std::fs::copy(d.join("plain.qcow2"), d.join("proto.qcow2")).unwrap();
    patch(d, "proto.qcow2", |f| {
        replace_extension(f, 0x4441_5441, b"nbd:localhost:10809")
    });
}

fn be64(f: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(f[o..o + 8].try_into().unwrap())
}

fn patch(d: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let p = d.join(name);
    let mut b = std::fs::read(&p).unwrap();
    f(&mut b);
    std::fs::write(&p, b).unwrap();
}

/// Offset of the header extension `ty` (its type field) in cluster 0.
fn find_extension(f: &[u8], ty: u32) -> usize {
    let mut off = u32::from_be_bytes(f[100..104].try_into().unwrap()) as usize;
    loop {
        let t = u32::from_be_bytes(f[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(f[off + 4..off + 8].try_into().unwrap()) as usize;
        if t == ty {
            return off;
        }
        assert_ne!(t, 0, "extension {ty:#x} not found");
        off += 8 + len.div_ceil(8) * 8;
    }
}

/// Rewrite the extensions from `ty` on with `ty` replaced (`None`: dropped).
fn rewrite_extension(f: &mut [u8], ty: u32, data: Option<&[u8]>) {
    let at = find_extension(f, ty);
    let mut rest = Vec::new();
    let mut off = at;
    loop {
        let t = u32::from_be_bytes(f[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(f[off + 4..off + 8].try_into().unwrap()) as usize;
        let body = f[off + 8..off + 8 + len].to_vec();
        let (t, body) = if t == ty {
            match data {
                Some(d) => (t, d.to_vec()),
                None => {
                    off += 8 + len.div_ceil(8) * 8;
                    continue;
                }
            }
        } else {
            (t, body)
        };
        rest.extend_from_slice(&t.to_be_bytes());
        rest.extend_from_slice(&(body.len() as u32).to_be_bytes());
        rest.extend_from_slice(&body);
        rest.resize(rest.len().div_ceil(8) * 8, 0);
        if t == 0 {
            break;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    f[at..at + rest.len()].copy_from_slice(&rest);
}

fn remove_extension(f: &mut [u8], ty: u32) {
    rewrite_extension(f, ty, None)
}

fn replace_extension(f: &mut [u8], ty: u32, data: &[u8]) {
    rewrite_extension(f, ty, Some(data))
}

fn empty(_: &Path) {}

#[test]
fn create_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    for (i, opts) in [
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,data_file_raw=off",
        "data_file=d.raw,data_file_raw=on,preallocation=full",
        "data_file=d.raw,preallocation=metadata",
        "data_file=d.raw,preallocation=falloc",
        "data_file=d.raw,extended_l2=on",
        "data_file=d.raw,cluster_size=4k,refcount_bits=1",
        // Errors.
        "data_file=d.raw,compat=0.10",
        "data_file_raw=on",
        "data_file=json:{}",
    ]
    .iter()
    .enumerate()
    {
        let cmd = format!("create -f qcow2 -o {opts} img.qcow2 3000000");
        let dirs = both(&format!("df-create-{i}"), &cmd, empty);
        same_files(&dirs.0, &dirs.1, &cmd);
        cleanup(dirs);
    }
    // A backing file and a raw data file exclude each other.
    let dirs = both(
        "df-create-backing",
        "create -f qcow2 -b src.raw -F raw -o data_file=d.raw,data_file_raw=on img.qcow2",
        prepare,
    );
    cleanup(dirs);
    // A backing file with a plain data file is fine.
    let dirs = both(
        "df-create-backing-ok",
        "create -f qcow2 -b src.raw -F raw -o data_file=d.raw img.qcow2",
        prepare,
    );
    same_files(&dirs.0, &dirs.1, "create with backing and data file");
    cleanup(dirs);
}

#[test]
fn info_map_check_match_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    for img in ["plain.qcow2", "raw.qcow2", "xl2.qcow2"] {
        for cmd in [
            "info",
            "info --output=json",
            "info --backing-chain",
            "map",
            "map --output=json",
            "check",
            "check --output=json",
            "check -r leaks",
            "check -r all",
            "snapshot -l",
            "compare src.raw",
        ] {
            let dirs = both(&format!("df-{cmd}-{img}"), &format!("{cmd} {img}"), prepare);
            cleanup(dirs);
        }
    }
    // A data file given as an option overrides the header's name.
    let dirs = both_args(
        "df-imageopts",
        &[
            "map",
            "--output=json",
            "--image-opts",
            "driver=qcow2,file.filename=plain.qcow2,data-file.filename=d.raw",
        ],
        prepare,
    );
    cleanup(dirs);
}

#[test]
fn convert_to_a_data_file_matches_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    for (i, opts) in ["data_file=out.raw", "data_file=out.raw,data_file_raw=on"]
        .iter()
        .enumerate()
    {
        let cmd = format!("convert -O qcow2 -o {opts} src.raw out.qcow2");
        let dirs = both(&format!("df-convert-{i}"), &cmd, prepare);
        same_files(&dirs.0, &dirs.1, &cmd);
        // The result reads back through QEMU as the source.
        let o = run(QEMU_IMG, &split("compare src.raw out.qcow2"), &dirs.1);
        assert_eq!(o.rc, 0, "{cmd}: {}", o.stdout);
        // Guest data sits at the guest offset: the data file equals the source.
        let src = std::fs::read(dirs.1.join("src.raw")).unwrap();
        assert!(std::fs::read(dirs.1.join("out.raw")).unwrap() == src);
        cleanup(dirs);
    }
    // And back out of a data file image.
    let dirs = both(
        "df-convert-out",
        "convert -O raw raw.qcow2 back.raw",
        prepare,
    );
    same_files(&dirs.0, &dirs.1, "convert out of a data file image");
    cleanup(dirs);
}

#[test]
fn amend_measure_resize_snapshot_match_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    for (i, cmd) in [
        "amend -o data_file_raw=off raw.qcow2",
        "amend -o data_file_raw=on raw.qcow2",
        "amend -o data_file_raw=on plain.qcow2",
        "amend -o data_file=d.raw plain.qcow2",
        "amend -o data_file=other.raw plain.qcow2",
        "amend -o data_file=d.raw nodata.qcow2",
        "amend -o data_file_raw=off nodata.qcow2",
        "amend -o compat=0.10 plain.qcow2",
        "measure -O qcow2 -o data_file=m.raw src.raw",
        "measure -O qcow2 -o data_file=m.raw,data_file_raw=on --size 1G",
        "measure --output=json -O qcow2 -o data_file=m.raw plain.qcow2",
        "resize raw.qcow2 6M",
        "resize plain.qcow2 +1M",
        "resize --shrink plain.qcow2 1M",
        "resize --shrink raw.qcow2 1M",
        "snapshot -c s1 plain.qcow2",
        // The header is rewritten with the data file extension kept.
        "rebase -u -b src.raw -F raw top.qcow2",
        "rebase -b src.raw -F raw top.qcow2",
    ]
    .iter()
    .enumerate()
    {
        let dirs = both(&format!("df-amend-{i}"), cmd, prepare);
        same_files(&dirs.0, &dirs.1, cmd);
        // What changed still reads the same through QEMU.
        for img in ["plain.qcow2", "raw.qcow2"] {
            let q = run(QEMU_IMG, &["map", "--output=json", img], &dirs.0);
            let b = run(QEMU_IMG, &["map", "--output=json", img], &dirs.1);
            assert_eq!(b, q, "{cmd}: map of {img} afterwards");
        }
        cleanup(dirs);
    }
    // Committing a data file image into its base empties it in place (the top image and its
    // data file byte for byte; the base's clusters are allocated in the order of QEMU's
    // concurrent copy, so only its contents are compared).
    for (i, cmd) in ["commit top.qcow2", "commit -d top.qcow2"]
        .iter()
        .enumerate()
    {
        let dirs = both(&format!("df-commit-{i}"), cmd, prepare);
        for f in ["top.qcow2", "t.raw"] {
            let q = std::fs::read(dirs.0.join(f)).unwrap();
            let b = std::fs::read(dirs.1.join(f)).unwrap();
            assert!(q == b, "{cmd}: {f} differs");
        }
        let qb = dirs.0.join("base.qcow2");
        let bb = dirs.1.join("base.qcow2");
        let o = run(
            QEMU_IMG,
            &["compare", qb.to_str().unwrap(), bb.to_str().unwrap()],
            &dirs.1,
        );
        assert_eq!(o.rc, 0, "{cmd}: bases differ: {o:?}");
        let o = run(QEMU_IMG, &["check", "base.qcow2"], &dirs.1);
        assert_eq!(o.rc, 0, "{cmd}: {o:?}");
        cleanup(dirs);
    }
    // After a changed name, the image opens only with the new data file there (QEMU's
    // info does not open it at all).
    let dirs = both(
        "df-amend-rename",
        "amend -o data_file=e.raw plain.qcow2",
        prepare,
    );
    for cmd in ["info plain.qcow2", "map plain.qcow2", "check plain.qcow2"] {
        let q = run(QEMU_IMG, &split(cmd), &dirs.0);
        let b = run(BLOCKD_IMG, &split(cmd), &dirs.1);
        assert_eq!(b, q, "{cmd} after renaming the data file");
    }
    cleanup(dirs);
}

#[test]
fn broken_data_file_settings() {
    if !have_qemu_img() {
        return;
    }
    // Where QEMU's answer is the reference.
    for (i, cmd) in [
        "check noname.qcow2",
        "map noname.qcow2",
        "info noname.qcow2",
        "check rawbit.qcow2",
        "info rawbit.qcow2",
        "check comp.qcow2",
        "check --output=json comp.qcow2",
    ]
    .iter()
    .enumerate()
    {
        let dirs = both(&format!("df-broken-{i}"), cmd, prepare);
        cleanup(dirs);
    }
    let dirs = both_args(
        "df-broken-opt",
        &[
            "map",
            "--image-opts",
            "driver=qcow2,file.filename=nodata.qcow2,data-file.filename=src.raw",
        ],
        prepare,
    );
    let o = run(
        BLOCKD_IMG,
        &[
            "map",
            "--image-opts",
            "driver=qcow2,file.filename=nodata.qcow2,data-file.filename=src.raw",
        ],
        &dirs.1,
    );
    assert!(
        o.stderr
            .contains("'data-file' can only be set for images with an external data file"),
        "{o:?}"
    );
    assert!(
        run(BLOCKD_IMG, &split("check rawbit.qcow2"), &dirs.1)
            .stderr
            .contains("data-file-raw requires a data file")
    );
    assert!(
        run(BLOCKD_IMG, &split("map noname.qcow2"), &dirs.1)
            .stderr
            .contains("'data-file' is required for this image")
    );
    // Names stored in images that are json: specifications or have a protocol prefix are
    // never followed (QEMU would): a clear error, nothing opened.
    for (img, what) in [
        ("json.qcow2", "is a json: specification"),
        ("proto.qcow2", "has a protocol prefix"),
    ] {
        for cmd in ["map", "check", "convert -O raw"] {
            let mut args = split(cmd);
            args.push(img);
            if cmd.starts_with("convert") {
                args.push("out.raw");
            }
            let o = run(BLOCKD_IMG, &args, &dirs.1);
            assert_eq!(o.rc, 1, "{cmd} {img}: {o:?}");
            assert!(o.stderr.contains(what), "{cmd} {img}: {o:?}");
        }
        // info reads only the header (as QEMU's, it opens no data file).
        let q = run(BLOCKD_IMG, &["info", img], &dirs.1);
        assert_eq!(q.rc, 0, "{q:?}");
    }
    // Blockd's own refusal at create: a data file only ever is a plain file.
    let o = run(
        BLOCKD_IMG,
        &split("create -f qcow2 -o data_file=nbd:localhost:1 new.qcow2 1M"),
        &dirs.1,
    );
    assert_eq!(o.rc, 1);
    assert!(o.stderr.contains("protocol prefix"), "{o:?}");
    cleanup(dirs);
}
