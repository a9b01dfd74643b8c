//! The `qcow2` block driver: opening (header, tables, backing file), the BlockDriver trait,
//! probing, and what `qemu-img info` shows.

use std::any::Any;
use std::cell::Cell;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockd_aio::IoBuf;
use blockd_block::driver::{ReopenPrepared, ReopenRequest};
use blockd_block::drivers::{Opened, child_edge};
use blockd_block::options::{ChildSpec, Opts};
use blockd_block::{
    BlockDriver, BlockStatus, BufResult, Graph, IoFuture, Node, OpenFlags, Perm, ReqFlags,
    SnapshotInfo,
};
use serde_json::{Map, Value, json};

use crate::cache::CacheConfig;
use crate::header::{self, Header};
use crate::image::{Image, pread, pwrite};

pub struct Qcow2 {
    pub image: Image,
    /// Persistent dirty bitmaps (`bitmaps.rs`): the node's bitmap list, stored at close.
    pub bitmaps: crate::bitmaps::Persist,
    /// Whether want-zero block status looks into the file under data clusters.
    pub prealloc: crate::prealloc::Detection,
}

impl Drop for Qcow2 {
    /// Closing: persistent bitmaps go to the image before the image's own close flush.
    fn drop(&mut self) {
        let (Some(file), false) = (self.image.file.clone(), self.image.is_read_only()) else {
            return;
        };
        let me: &Qcow2 = self;
        if let Err(e) = run_sync(|| me.bitmaps.store(&me.image, &file)) {
            eprintln!(
                "qcow2: could not store persistent dirty bitmaps at close: {}",
                blockd_block::strerror(&e)
            );
        }
    }
}

impl Qcow2 {
    /// QEMU's checks before `block-dirty-bitmap-add persistent=true` on this image.
    pub fn can_store_new_bitmap(&self, name: &str, granularity: u64) -> Result<(), String> {
        self.bitmaps.can_store_new(&self.image, name, granularity)
    }
}

/// QEMU's probe: the magic and a version it knows.
pub fn probe(buf: &[u8], _filename: &str) -> u32 {
    if buf.len() >= 8 && buf[..4] == header::MAGIC.to_be_bytes() {
        let v = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if v >= 2 { 100 } else { 0 }
    } else {
        0
    }
}

/// Run open-time I/O to completion from synchronous code: on this thread when it runs no
/// event loop, else on a helper thread with its own (never a nested loop, DESIGN.md rule 3).
pub fn run_sync<T: Send, F: std::future::Future<Output = T>>(make: impl FnOnce() -> F + Send) -> T {
    if blockd_aio::block_on(async {}).is_ok() {
        if let Ok(v) = blockd_aio::block_on(make()) {
            return v;
        }
        unreachable!("the loop was idle a moment ago on this very thread");
    }
    std::thread::scope(|s| {
        s.spawn(|| blockd_aio::block_on(make()).expect("a fresh thread runs no loop"))
            .join()
            .expect("open I/O thread panicked")
    })
}

thread_local! {
    static BACKING_DEPTH: Cell<u32> = const { Cell::new(0) };
    static SKIP_DATA_FILES: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the qcow2 opens on this thread leaving out the data files images name and
/// their checks (QEMU's BDRV_O_NO_IO opens of `qemu-img info`): metadata only, guest data
/// of such images unreachable (ENOMEDIUM).
pub fn without_data_files<T>(f: impl FnOnce() -> T) -> T {
    let before = SKIP_DATA_FILES.with(|s| s.replace(true));
    let r = f();
    SKIP_DATA_FILES.with(|s| s.set(before));
    r
}
const MAX_BACKING_DEPTH: u32 = 64;

/// Whether a backing name starts with a protocol prefix (`nbd:`, `http:`, `json:` ...):
/// a colon before any slash, as QEMU's path_has_protocol.
fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(c) => !name[..c].contains('/'),
        None => false,
    }
}

/// Resolve an image-provided backing name against the image's directory.
pub fn resolve_backing(image_filename: Option<&str>, name: &str) -> Result<String, String> {
    if name.starts_with("json:") {
        return Err(format!(
            "Could not open backing file: backing file name '{name}' is a json: specification, which is refused for names stored in images"
        ));
    }
    if has_protocol(name) {
        return Err(format!(
            "Could not open backing file: backing file name '{name}' has a protocol prefix, which is refused for names stored in images"
        ));
    }
    if name.contains('\0') {
        return Err("Could not open backing file: backing file name contains a NUL byte".into());
    }
    if name.starts_with('/') {
        return Ok(name.to_string());
    }
    match image_filename.and_then(|f| f.rfind('/').map(|i| &f[..=i])) {
        Some(dir) => Ok(format!("{dir}{name}")),
        None => Ok(name.to_string()),
    }
}

/// The file the data file name an image records opens: as QEMU 10 opens it, the name as it
/// is (a relative name is relative to the current directory, not to the image's, unlike
/// backing names), refusing `json:` specifications and protocol prefixes as for backing
/// names.
pub fn resolve_data_file(name: &str) -> Result<String, String> {
    if name.starts_with("json:") {
        return Err(format!(
            "Could not open data file: data file name '{name}' is a json: specification, which is refused for names stored in images"
        ));
    }
    if has_protocol(name) {
        return Err(format!(
            "Could not open data file: data file name '{name}' has a protocol prefix, which is refused for names stored in images"
        ));
    }
    if name.contains('\0') || name.is_empty() {
        return Err(
            "Could not open data file: the data file name is empty or has a NUL byte".into(),
        );
    }
    Ok(name.to_string())
}

/// The file an image's own data file settings name (no `data-file` option given): None
/// without a data file; QEMU's errors for a data file bit without a name and a raw bit
/// without the data file bit; refused names (see [`resolve_data_file`]).
pub fn data_file_path(hdr: &Header) -> Result<Option<String>, String> {
    if !hdr.has_data_file() {
        if hdr.version >= 3 && hdr.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err("data-file-raw requires a data file".into());
        }
        return Ok(None);
    }
    match &hdr.data_file {
        // An empty name names nothing.
        Some(n) if n.is_empty() => Err("'data-file' is required for this image".into()),
        None => Err("'data-file' is required for this image".into()),
        Some(name) => resolve_data_file(name).map(Some),
    }
}

/// The `data-file` child: the `data-file` option (a node name or options), else the name
/// in the header, opened as a plain file (QEMU's checks and messages).
fn open_data_file(
    graph: &mut Graph,
    hdr: &Header,
    spec: Option<ChildSpec>,
    flags: OpenFlags,
) -> Result<Option<Arc<Node>>, String> {
    let given = match spec {
        None => None,
        Some(ChildSpec::Reference(n)) if n.is_empty() => None,
        Some(ChildSpec::Reference(n)) => Some(
            graph
                .node(&n)
                .ok_or_else(|| format!("Cannot find device='' nor node-name='{n}'"))?,
        ),
        Some(ChildSpec::Options(mut m)) => {
            if !m.contains_key("driver") && m.contains_key("filename") {
                m.insert("driver".into(), Value::String("file".into()));
            }
            Some(graph.open_with(m, flags)?)
        }
    };
    if SKIP_DATA_FILES.with(|s| s.get()) && (given.is_none() || !hdr.has_data_file()) {
        return Ok(None);
    }
    if !hdr.has_data_file() && given.is_some() {
        return Err("'data-file' can only be set for images with an external data file".into());
    }
    if let Some(d) = given {
        return Ok(Some(d));
    }
    let Some(path) = data_file_path(hdr)? else {
        return Ok(None);
    };
    let mut m = Map::new();
    m.insert("driver".into(), Value::String("file".into()));
    m.insert("filename".into(), Value::String(path));
    graph.open_with(m, flags).map(Some)
}

fn read_probe_bytes(path: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| {
        format!(
            "Could not open backing file: Could not open '{path}': {}",
            blockd_block::strerror(&e)
        )
    })?;
    let mut buf = vec![0u8; 2048];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

pub fn open(
    graph: &mut Graph,
    _driver: &str,
    o: &mut Opts,
    flags: OpenFlags,
) -> Result<Opened, String> {
    // The file child, remembering its filename to resolve relative backing names.
    let (file, filename) = match o.take_child("file") {
        None => return Err("A block device must be specified for \"file\"".into()),
        Some(ChildSpec::Reference(n)) => (
            graph
                .node(&n)
                .ok_or_else(|| format!("Cannot find device='' nor node-name='{n}'"))?,
            None,
        ),
        Some(ChildSpec::Options(mut m)) => {
            let filename = m
                .get("filename")
                .and_then(|v| v.as_str())
                .map(str::to_string);
            if !m.contains_key("driver") && m.contains_key("filename") {
                m.insert("driver".into(), Value::String("file".into()));
            }
            (graph.open_with(m, flags)?, filename)
        }
    };
    let RuntimeOpts {
        overlap,
        lazy,
        pass_discard,
    } = runtime_opts(o, false)?;
    let data_spec = o.take_child("data-file");
    if o.take("encrypt").is_some() {
        return Err("Encrypted qcow2 images are not supported yet".into());
    }

    let file2 = file.clone();
    let hdr = run_sync(move || async move {
        let flen = file2.length();
        let first = pread(&file2, 0, flen.min(512) as usize)
            .await
            .map_err(|e| {
                format!(
                    "Could not read qcow2 header: {}",
                    blockd_block::strerror(&e)
                )
            })?;
        let cs = Header::needed_len(&first)?;
        let buf = pread(&file2, 0, cs.min(flen) as usize).await.map_err(|e| {
            format!(
                "Could not read qcow2 header: {}",
                blockd_block::strerror(&e)
            )
        })?;
        Header::parse(&buf, flen)
    })?;
    if lazy == Some(true) && hdr.version < 3 {
        return Err(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                .into(),
        );
    }
    if !flags.read_only && hdr.incompatible & header::INCOMPAT_CORRUPT != 0 {
        return Err("qcow2: Image is corrupt; cannot be opened read/write".into());
    }
    let cache = CacheConfig::from_opts(o, hdr.size, hdr.cluster_size(), hdr.l2_entry_size())?;
    let data_file = open_data_file(graph, &hdr, data_spec, flags)?;

    // The backing file: explicit option, `null`, or the header's name.
    let backing = match o.take("backing") {
        Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(n)) => Some(
            graph
                .node(&n)
                .ok_or_else(|| format!("Cannot find device='' nor node-name='{n}'"))?,
        ),
        Some(Value::Object(mut m)) => {
            if !m.contains_key("driver") && m.contains_key("filename") {
                m.insert("driver".into(), Value::String("file".into()));
            }
            Some(open_backing(graph, m, flags)?)
        }
        Some(_) => return Err("Invalid parameter type for 'backing', expected: string".into()),
        None => match &hdr.backing_file {
            None => None,
            Some(name) => {
                let path = resolve_backing(filename.as_deref(), name)?;
                let fmt = match &hdr.backing_format {
                    Some(f) => f.clone(),
                    None => {
                        let bytes = read_probe_bytes(&path)?;
                        graph.probe_format(&bytes, &path).to_string()
                    }
                };
                let mut m = Map::new();
                m.insert("driver".into(), Value::String(fmt));
                m.insert("file".into(), json!({"driver": "file", "filename": path}));
                Some(open_backing(graph, m, flags)?)
            }
        },
    };

    let read_only = flags.read_only;
    let file2 = file.clone();
    let hdr2 = hdr.clone();
    let image = run_sync(move || async move {
        let img = Image::load(&file2, hdr2, cache, read_only, overlap, pass_discard).await?;
        if let Some(l) = lazy
            && !read_only
        {
            img.lazy_refcounts.store(l, Ordering::Relaxed);
        }
        let bitmaps = crate::bitmaps::Persist::load(&img, &file2, read_only).await?;
        if !read_only {
            img.prepare_writable(&file2).await?;
        }
        Ok::<_, String>((img, bitmaps))
    })?;
    let (image, bitmaps) = image;

    let (perm, shared) = file_perms(flags.read_only, flags.force_share);
    let mut children = vec![child_edge("file", file, perm, shared)];
    if let Some(d) = data_file {
        children.push(child_edge("data-file", d, perm, shared));
    }
    if let Some(b) = backing {
        children.push(child_edge("backing", b, Perm::CONSISTENT_READ, Perm::ALL));
    }
    let length = hdr.size;
    Ok(Opened {
        driver: Box::new(Qcow2 {
            image,
            bitmaps,
            prealloc: Default::default(),
        }),
        children,
        length,
    })
}

/// What qcow2 needs of its file: read, and write and resize unless read-only.
pub(crate) fn file_perms(read_only: bool, force_share: bool) -> (Perm, Perm) {
    let mut perm = Perm::CONSISTENT_READ;
    if !read_only {
        perm = perm | Perm::WRITE | Perm::RESIZE;
    }
    let shared = if force_share {
        Perm::ALL
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
    };
    (perm, shared)
}

/// The options a reopen may change (QEMU's runtime options), as open reads them.
pub(crate) struct RuntimeOpts {
    pub overlap: bool,
    pub lazy: Option<bool>,
    pub pass_discard: bool,
}

pub(crate) fn runtime_opts(o: &mut Opts, reopen: bool) -> Result<RuntimeOpts, String> {
    let overlap = match o.take("overlap-check") {
        None => true,
        Some(Value::String(s)) => match s.as_str() {
            "none" => false,
            "constant" | "cached" | "all" => true,
            // blockdev-reopen's arguments are checked against the QAPI schema first.
            _ if reopen => {
                return Err(format!(
                    "Parameter 'overlap-check' does not accept value '{s}'"
                ));
            }
            _ => {
                return Err(format!(
                    "Unsupported value '{s}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
                ));
            }
        },
        Some(Value::Object(m)) => {
            let mut sub = Opts::nested(m, "overlap-check.");
            let template = sub.take_str("template")?;
            let mut any = template.as_deref() != Some("none");
            for k in [
                "main-header",
                "active-l1",
                "active-l2",
                "refcount-table",
                "refcount-block",
                "snapshot-table",
                "inactive-l1",
                "inactive-l2",
                "bitmap-directory",
            ] {
                if let Some(b) = sub.take_bool(k)? {
                    any |= b;
                }
            }
            sub.finish("qcow2", true)?;
            any
        }
        Some(_) => {
            return Err("Invalid parameter type for 'overlap-check', expected: string".into());
        }
    };
    let lazy = o.take_bool("lazy-refcounts")?;
    let pass_discard = o.take_bool("pass-discard-request")?.unwrap_or(true);
    // Snapshots are only taken offline, where nothing is passed down either way.
    let _ = o.take_bool("pass-discard-snapshot")?;
    if o.take_bool("pass-discard-other")? == Some(true) {
        return Err("qcow2 option 'pass-discard-other=on' is not supported yet".into());
    }
    if o.take_bool("discard-no-unref")? == Some(true) {
        return Err("qcow2 option 'discard-no-unref=on' is not supported yet".into());
    }
    Ok(RuntimeOpts {
        overlap,
        lazy,
        pass_discard,
    })
}

fn open_backing(
    graph: &mut Graph,
    mut m: Map<String, Value>,
    flags: OpenFlags,
) -> Result<Arc<Node>, String> {
    let depth = BACKING_DEPTH.with(|d| d.get());
    if depth >= MAX_BACKING_DEPTH {
        return Err("Could not open backing file: backing chain too deep (a loop?)".into());
    }
    m.entry("read-only").or_insert(Value::Bool(true));
    let bflags = OpenFlags {
        read_only: true,
        ..flags
    };
    BACKING_DEPTH.with(|d| d.set(depth + 1));
    let r = graph.open_with(m, bflags);
    BACKING_DEPTH.with(|d| d.set(depth));
    r.map_err(|e| {
        if e.starts_with("Could not open backing file") {
            e
        } else {
            format!("Could not open backing file: {e}")
        }
    })
}

impl Image {
    /// A writable open: clear autoclear bits we do not maintain (all but the bitmaps bit,
    /// which `bitmaps.rs` maintains), and repair a dirty image.
    async fn prepare_writable(&self, file: &Arc<Node>) -> Result<(), String> {
        let (dirty, autoclear, version) = {
            let h = self.header.lock().unwrap_or_else(|e| e.into_inner());
            (
                h.incompatible & header::INCOMPAT_DIRTY != 0,
                h.autoclear,
                h.version,
            )
        };
        // Bit 0 stays when the bitmaps were loaded (`bitmaps.rs` keeps them consistent); bit 1
        // stays with a data file (the I/O paths keep a raw data file raw).
        let raw =
            autoclear & header::AUTOCLEAR_DATA_FILE_RAW & if self.geo.data_file { !0 } else { 0 };
        let keep = raw
            | if self
                .header
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .bitmaps
                .is_some()
            {
                autoclear & header::AUTOCLEAR_BITMAPS
            } else {
                0
            };
        if version >= 3 && autoclear != keep {
            pwrite(file, 88, &keep.to_be_bytes()).await.map_err(|e| {
                format!(
                    "Could not update qcow2 header: {}",
                    blockd_block::strerror(&e)
                )
            })?;
            self.header
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .autoclear = keep;
        }
        if dirty {
            crate::check::repair_dirty(self, file).await?;
        }
        Ok(())
    }
}

impl BlockDriver for Qcow2 {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn dirty_bitmap_list(&self) -> Option<Arc<blockd_block::DirtyBitmapList>> {
        Some(self.bitmaps.list.clone())
    }

    fn is_format(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, node: &'a Node, off: u64, buf: IoBuf) -> IoFuture<'a, BufResult> {
        self.image.remember_node(node);
        Box::pin(self.image.read(node, off, buf))
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        buf: IoBuf,
        flags: ReqFlags,
    ) -> IoFuture<'a, BufResult> {
        self.image.remember_node(node);
        Box::pin(self.image.write(node, off, buf, flags))
    }

    fn flush<'a>(&'a self, node: &'a Node) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            // Cached metadata first (refcount blocks, then L2 tables), then the file's flush.
            let f = node
                .child("file")
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))?;
            // The data file first: L2 entries on disk may point at its new clusters.
            if let Some(d) = node.child("data-file") {
                d.driver().flush(&d).await?;
            }
            if self.image.has_dirty() {
                let _a = self.image.alloc.lock().await;
                self.image.apply_frees(&f).await?;
                self.image.writeback(&f).await?;
            }
            f.driver().flush(&f).await
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, off: u64, len: u64) -> IoFuture<'a, io::Result<()>> {
        self.image.remember_node(node);
        Box::pin(self.image.discard(node, off, len))
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
        flags: ReqFlags,
    ) -> IoFuture<'a, io::Result<()>> {
        self.image.remember_node(node);
        Box::pin(self.image.write_zeroes(node, off, len, flags))
    }

    fn block_status<'a>(
        &'a self,
        node: &'a Node,
        off: u64,
        len: u64,
    ) -> IoFuture<'a, io::Result<BlockStatus>> {
        self.image.remember_node(node);
        Box::pin(self.image.block_status(node, off, len))
    }

    fn data_child(&self, node: &Node) -> Option<Arc<Node>> {
        let file = node.child("file")?;
        self.image.data_node(node, &file).ok()
    }

    fn status_recurses<'a>(&'a self, node: &'a Node) -> IoFuture<'a, bool> {
        Box::pin(async move {
            match node.child("file") {
                Some(file) => self.prealloc.recurse(&self.image, &file).await,
                None => false,
            }
        })
    }

    fn truncate<'a>(&'a self, node: &'a Node, len: u64) -> IoFuture<'a, io::Result<u64>> {
        self.image.remember_node(node);
        Box::pin(self.image.truncate(node, len))
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.image.geo.cluster_size)
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn reopen_prepare(
        &self,
        node: &Node,
        req: &mut ReopenRequest<'_>,
    ) -> Result<ReopenPrepared, String> {
        let prepared = crate::reopen::prepare(&self.image, node, req)?;
        // Going read-only: persistent bitmaps are stored now, while the file is writable (as
        // QEMU does); an abort marks them in use again.
        if req.read_only
            && !self.image.is_read_only()
            && let Some(f) = self.image.file.clone()
        {
            run_sync(|| self.bitmaps.store(&self.image, &f)).map_err(|e| {
                format!(
                    "Could not store persistent dirty bitmaps of node '{}': {}",
                    node.name(),
                    blockd_block::strerror(&e)
                )
            })?;
        }
        Ok(prepared)
    }

    fn reopen_commit(&self, _node: &Node, state: Box<dyn Any + Send>) {
        if let Ok(s) = state.downcast::<crate::reopen::Prepared>() {
            s.commit(&self.image);
        }
        if self.image.is_read_only() {
            for b in self.bitmaps.list.all() {
                b.set_readonly(true);
            }
        }
    }

    fn reopen_abort(&self, _node: &Node, _state: Box<dyn Any + Send>) {
        // A store made by the prepare of a reopen to read-only: the image stays writable.
        if !self.image.is_read_only()
            && let Some(f) = self.image.file.clone()
            && let Err(e) = run_sync(|| self.bitmaps.mark_in_use(&self.image, &f))
        {
            eprintln!(
                "qcow2: could not mark persistent dirty bitmaps in use again: {}",
                blockd_block::strerror(&e)
            );
        }
    }

    fn reopen_commit_post(&self, node: &Node) {
        // Made writable: the loaded persistent bitmaps are in use on disk again and take
        // writes (QEMU's reopen of bitmaps read-write).
        if self.image.is_read_only() || self.bitmaps.list.all().is_empty() {
            return;
        }
        let Some(f) = self.image.file.clone() else {
            return;
        };
        match run_sync(|| self.bitmaps.mark_in_use(&self.image, &f)) {
            Ok(()) => {
                for b in self.bitmaps.list.all() {
                    b.set_readonly(false);
                }
            }
            Err(e) => eprintln!(
                "qcow2: could not make the persistent dirty bitmaps of node '{}' writable: {}",
                node.name(),
                blockd_block::strerror(&e)
            ),
        }
    }

    fn is_dirty(&self) -> bool {
        self.image.header().incompatible & header::INCOMPAT_DIRTY != 0
    }

    fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.image.snapshots().iter().map(snapshot_info).collect()
    }

    fn snapshot_create<'a>(
        &'a self,
        node: &'a Node,
        sn: SnapshotInfo,
    ) -> IoFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let f = node
                .child("file")
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))?;
            let entry = crate::image::Snapshot {
                l1_offset: 0,
                l1_size: 0,
                id: sn.id,
                name: sn.name,
                // The table keeps 32 bits of seconds, as QEMU's.
                date_sec: sn.date_sec as u32,
                date_nsec: sn.date_nsec,
                vm_clock_nsec: sn.vm_clock_nsec,
                vm_state_size: sn.vm_state_size,
                disk_size: None,
                icount: sn.icount,
            };
            self.image.create_snapshot(&f, entry).await
        })
    }

    fn snapshot_delete<'a>(
        &'a self,
        node: &'a Node,
        id: Option<&'a str>,
        name: Option<&'a str>,
    ) -> IoFuture<'a, io::Result<SnapshotInfo>> {
        Box::pin(async move {
            let f = node
                .child("file")
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))?;
            let gone = self.image.delete_snapshot(&f, id, name).await?;
            Ok(snapshot_info(&gone))
        })
    }

    fn format_specific(&self) -> Option<Value> {
        let mut v = format_specific(
            &self.image.header(),
            self.image.corrupt.load(Ordering::SeqCst),
        );
        let bitmaps = self.bitmap_directory();
        if !bitmaps.is_empty()
            && let Some(d) = v.get_mut("data").and_then(Value::as_object_mut)
        {
            let list = bitmaps
                .iter()
                .map(|e| {
                    json!({"flags": bitmap_flags(e.flags), "name": e.name,
                           "granularity": 1u64 << e.granularity_bits})
                })
                .collect::<Vec<_>>();
            d.insert("bitmaps".into(), Value::Array(list));
        }
        Some(v)
    }

    fn info(&self) -> Vec<(String, String)> {
        let h = self.image.header();
        let mut v = vec![
            ("compat".to_string(), compat(&h).to_string()),
            ("compression type".into(), compression(&h).into()),
        ];
        if h.version >= 3 {
            let lazy = h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0;
            let corrupt = h.incompatible & header::INCOMPAT_CORRUPT != 0
                || self.image.corrupt.load(Ordering::SeqCst);
            v.push(("lazy refcounts".into(), lazy.to_string()));
            let bitmaps = self.bitmap_directory();
            if !bitmaps.is_empty() {
                // A nested list: the value starts with a newline (qemu-img's layout).
                let mut t = String::new();
                for (i, e) in bitmaps.iter().enumerate() {
                    t += &format!("\n        [{i}]:\n            flags:");
                    for (j, f) in bitmap_flags(e.flags).iter().enumerate() {
                        t += &format!("\n                [{j}]: {f}");
                    }
                    t += &format!(
                        "\n            name: {}\n            granularity: {}",
                        e.name,
                        1u64 << e.granularity_bits
                    );
                }
                v.push(("bitmaps".into(), t));
            }
            v.push(("refcount bits".into(), h.refcount_bits().to_string()));
            if let Some(name) = &h.data_file {
                v.push(("data file".into(), name.clone()));
            }
            if h.has_data_file() {
                v.push(("data file raw".into(), h.data_file_raw().to_string()));
            }
            v.push(("corrupt".into(), corrupt.to_string()));
            v.push(("extended l2".into(), h.extended_l2().to_string()));
        } else {
            v.push(("refcount bits".into(), h.refcount_bits().to_string()));
        }
        v
    }
}

/// QEMU's Qcow2BitmapInfoFlags names of a bitmap directory entry's flags.
fn bitmap_flags(flags: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    if flags & crate::bitmaps::FLAG_IN_USE != 0 {
        v.push("in-use");
    }
    if flags & crate::bitmaps::FLAG_AUTO != 0 {
        v.push("auto");
    }
    v
}

impl Qcow2 {
    /// The bitmap directory as it is on disk (what `qemu-img info` lists).
    fn bitmap_directory(&self) -> Vec<crate::bitmaps::DirEntry> {
        self.bitmaps
            .on_disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A snapshot table entry as the block layer describes snapshots.
fn snapshot_info(s: &crate::image::Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        vm_state_size: s.vm_state_size,
        date_sec: s.date_sec as u64,
        date_nsec: s.date_nsec,
        vm_clock_nsec: s.vm_clock_nsec,
        icount: s.icount,
    }
}

fn compat(h: &Header) -> &'static str {
    if h.version >= 3 { "1.1" } else { "0.10" }
}

fn compression(h: &Header) -> &'static str {
    if h.compression_type == 1 {
        "zstd"
    } else {
        "zlib"
    }
}

/// QEMU's ImageInfoSpecific for qcow2.
pub fn format_specific(h: &Header, corrupt_now: bool) -> Value {
    let mut d = Map::new();
    d.insert("compat".into(), json!(compat(h)));
    d.insert("compression-type".into(), json!(compression(h)));
    if h.version >= 3 {
        d.insert(
            "lazy-refcounts".into(),
            json!(h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0),
        );
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if let Some(name) = &h.data_file {
            d.insert("data-file".into(), json!(name));
        }
        if h.has_data_file() {
            d.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        d.insert(
            "corrupt".into(),
            json!(h.incompatible & header::INCOMPAT_CORRUPT != 0 || corrupt_now),
        );
        d.insert("extended-l2".into(), json!(h.extended_l2()));
    } else {
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
    }
    json!({"type": "qcow2", "data": Value::Object(d)})
}
