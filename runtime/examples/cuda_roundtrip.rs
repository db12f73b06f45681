//! The CUDA backend end to end, in miniature, on one GPU: an owner exports the weights, fresh
//! processes import and verify them, the owner is killed, and the weights live on.
//!
//! ```text
//! cuda_roundtrip [--model PATH | --mib N [--dtype BF16]] [--children K] [--ipc auto|vmm|legacy]
//!                [--device D]
//! cuda_roundtrip --write-model PATH --mib N [--dtype BF16]   (a synthetic model; no GPU needed)
//! ```
//!
//! The process you start plays the zygote: it loads the model into a sealed memfd, never
//! touches CUDA (it checks its own `/proc/self/maps` for libcuda at the end), and starts every
//! other process by re-executing itself with a hidden `--role`, handing over the model memfd
//! and the weight handles over a Unix socket, as the runtime does:
//!
//! 1. an **owner** exports generation 1 (plan, allocate, upload through pinned buffers,
//!    device digest, export) and reports its timings and VRAM;
//! 2. K **importers** start one after the other; each imports, verifies the digest, checks
//!    one tensor against the host compute copy through cudarc (`clone_dtoh` takes our
//!    `WeightView` as a `DevicePtr`) and reports its spawn → ready time, import parts and VRAM;
//! 3. an importer given a manifest with a wrong content digest must refuse it;
//! 4. with VMM: the owner is killed with SIGKILL, every importer verifies its weights again,
//!    one more importer imports from the fds this process kept, and a new owner adopts the
//!    generation without uploading.
//!
//! Without CUDA the owner reports why, and this prints it and exits 0. Run it in release mode
//! (`cargo build --release --example cuda_roundtrip`); `scripts/gpu-check.sh` runs it.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zygote_runtime::backend::cuda::{self, CudaBackend};
use zygote_runtime::backend::{self, BackendError, DeviceBackend, IpcChoice, Manifest};
use zygote_runtime::model::{Dtype, Model};
use zygote_runtime::protocol::frame;
use zygote_runtime::{fdpass, logging, procfs, synth};

/// Messages between the driver process and its children, in the runtime's framing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Msg {
    /// Driver → child, followed by the model memfd and then `fds` weight handles.
    Start {
        model_path: String,
        model_digest: String,
        device: u32,
        ipc: String,
        manifest: Option<Manifest>,
        fds: u32,
    },
    /// Driver → importer: recompute the digest now.
    Verify,
    /// Owner → driver: no CUDA here.
    Unavailable { reason: String },
    /// Owner → driver, followed by `fds` handles.
    Exported {
        manifest: Manifest,
        fds: u32,
        export_ms: f64,
        vram_before: u64,
        vram_after: u64,
        vram_total: u64,
    },
    /// New owner → driver.
    Adopted { generation: u64, adopt_ms: f64 },
    /// Importer → driver.
    Ready {
        context_ms: f64,
        map_ms: f64,
        digest_ms: f64,
        read_only: bool,
        vram_used: u64,
    },
    /// Driver → importer: compare a tensor with the host compute copy.
    Compare,
    /// Importer → driver, after `Verify` or `Compare`.
    Verified { ok: bool, detail: String },
    /// Any child → driver.
    Failed { error: String },
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let result = match opt("--role").as_deref() {
        Some(role) => {
            logging::init(role);
            let socket = PathBuf::from(opt("--socket").unwrap_or_default());
            child_main(role, &socket)
        }
        None => {
            logging::init("roundtrip");
            driver_main(&opt)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cuda_roundtrip: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: plays the zygote and the supervisor. No CUDA in here.

struct Options {
    dtype: Dtype,
    model: Option<PathBuf>,
    mib: u64,
    children: usize,
    ipc: IpcChoice,
    device: u32,
}

fn driver_main(opt: &dyn Fn(&str) -> Option<String>) -> Result<ExitCode, String> {
    let parse_num = |name: &str, default: u64| -> Result<u64, String> {
        opt(name).map_or(Ok(default), |v| {
            v.parse().map_err(|e| format!("{name} {v}: {e}"))
        })
    };
    let dtype = Dtype::parse(opt("--dtype").as_deref().unwrap_or("BF16"))
        .map_err(|d| format!("--dtype {d}: not a safetensors dtype"))?;
    if let Some(path) = opt("--write-model") {
        let mib = parse_num("--mib", 1100)?;
        synth::write_synthetic(Path::new(&path), mib << 20, dtype, 1)
            .map_err(|e| format!("{path}: {e}"))?;
        println!("wrote {path} ({mib} MiB of {} weights)", dtype.as_str());
        return Ok(ExitCode::SUCCESS);
    }
    let o = Options {
        dtype,
        model: opt("--model").map(PathBuf::from),
        mib: parse_num("--mib", 256)?,
        children: parse_num("--children", 4)? as usize,
        ipc: opt("--ipc").as_deref().unwrap_or("auto").parse()?,
        device: parse_num("--device", 0)? as u32,
    };
    let dir = std::env::temp_dir().join(format!("cuda-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run(&o, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A child process and its connection.
struct Peer {
    child: Child,
    stream: UnixStream,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // Closing the connection ends the child; a child that does not end is killed.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Driver<'a> {
    listener: UnixListener,
    socket: PathBuf,
    model: Model,
    o: &'a Options,
}

impl Driver<'_> {
    /// Starts `role`, waits for it to connect, and sends it the model and `handles`.
    fn spawn(
        &self,
        role: &str,
        manifest: Option<&Manifest>,
        handles: &[OwnedFd],
    ) -> Result<Peer, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(exe)
            .args(["--role", role, "--socket"])
            .arg(&self.socket)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the {role}: {e}"))?;
        let mut peer = Peer {
            stream: accept(&self.listener, Duration::from_secs(30))
                .map_err(|e| format!("the {role} did not connect: {e}"))?,
            child,
        };
        let start = Msg::Start {
            model_path: self.model.path().display().to_string(),
            model_digest: self.model.digest().to_string(),
            device: self.o.device,
            ipc: self.o.ipc.to_string(),
            manifest: manifest.cloned(),
            fds: handles.len() as u32,
        };
        frame::write_frame(&mut peer.stream, &start).map_err(|e| e.to_string())?;
        fdpass::send_fd(peer.stream.as_fd(), self.model.memfd()).map_err(|e| e.to_string())?;
        fdpass::send_fds(peer.stream.as_fd(), handles).map_err(|e| e.to_string())?;
        Ok(peer)
    }
}

fn accept(listener: &UnixListener, timeout: Duration) -> std::io::Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn receive(peer: &mut Peer, timeout: Duration) -> Result<Msg, String> {
    match frame::read_frame::<_, Msg>(&mut peer.stream, Some(timeout)) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(format!(
            "the child ended without answering ({:?})",
            peer.child.wait()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn receive_fds(peer: &Peer, n: u32) -> Result<Vec<OwnedFd>, String> {
    (0..n)
        .map(|_| fdpass::recv_fd(peer.stream.as_fd()).map_err(|e| e.to_string()))
        .collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn p50(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(o: &Options, dir: &Path) -> Result<ExitCode, String> {
    let model_path = match &o.model {
        Some(p) => p.clone(),
        None => {
            let p = dir.join("synthetic.safetensors");
            synth::write_synthetic(&p, o.mib << 20, o.dtype, 1).map_err(|e| e.to_string())?;
            p
        }
    };
    let loaded = Instant::now();
    let model = Model::load(&model_path).map_err(|e| e.to_string())?;
    println!(
        "model: {} ({:.0} MiB, {} tensors), loaded into a sealed memfd in {} ms",
        model_path.display(),
        mib(model.len()),
        model.tensors().len(),
        loaded.elapsed().as_millis()
    );
    let socket = dir.join("roundtrip.sock");
    let listener = UnixListener::bind(&socket).map_err(|e| e.to_string())?;
    let d = Driver {
        listener,
        socket,
        model,
        o,
    };
    let mut failures = Vec::new();

    // 1. The owner.
    let mut owner = d.spawn("owner", None, &[])?;
    let (manifest, handles, vram_after_owner) = match receive(&mut owner, Duration::from_secs(600))?
    {
        Msg::Unavailable { reason } => {
            println!("CUDA is unavailable: {reason}");
            println!("nothing to check on this machine");
            return Ok(ExitCode::SUCCESS);
        }
        Msg::Exported {
            manifest,
            fds,
            export_ms,
            vram_before,
            vram_after,
            vram_total,
        } => {
            let handles = receive_fds(&owner, fds)?;
            let used: u64 = manifest.arenas.iter().map(|a| a.used).sum();
            let size: u64 = manifest.arenas.iter().map(|a| a.size).sum();
            println!(
                "owner: generation {} exported in {export_ms:.0} ms: ipc {}, {} arenas, \
                 {:.0} MiB used of {:.0} MiB allocated, {} fds",
                manifest.generation,
                manifest.ipc,
                manifest.arenas.len(),
                mib(used),
                mib(size),
                handles.len()
            );
            println!(
                "owner: VRAM used {:.0} MiB before the export, {:.0} MiB after (of {:.0} MiB)",
                mib(vram_before),
                mib(vram_after),
                mib(vram_total)
            );
            (manifest, handles, vram_after)
        }
        Msg::Failed { error } => return Err(format!("the owner failed: {error}")),
        other => return Err(format!("unexpected answer from the owner: {other:?}")),
    };

    // 2. The importers.
    let mut importers = Vec::new();
    let mut spawn_ms = Vec::new();
    let mut import_ms = Vec::new();
    let mut last_used = vram_after_owner;
    for i in 0..o.children {
        let t0 = Instant::now();
        let mut peer = d.spawn("import", Some(&manifest), &handles)?;
        match receive(&mut peer, Duration::from_secs(120))? {
            Msg::Ready {
                context_ms,
                map_ms,
                digest_ms,
                read_only,
                vram_used,
            } => {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                spawn_ms.push(ms);
                import_ms.push(context_ms + map_ms + digest_ms);
                println!(
                    "importer {i}: spawn→ready {ms:.1} ms (context {context_ms:.1}, map \
                     {map_ms:.1}, digest {digest_ms:.1}); {}; digest ok; VRAM used {:.0} MiB \
                     (+{:.0} MiB)",
                    if read_only { "read-only" } else { "read-write" },
                    mib(vram_used),
                    mib(vram_used.saturating_sub(last_used))
                );
                last_used = vram_used;
                frame::write_frame(&mut peer.stream, &Msg::Compare).map_err(|e| e.to_string())?;
                match receive(&mut peer, Duration::from_secs(120))? {
                    Msg::Verified { ok: true, detail } if i == 0 => {
                        println!("importer {i}: {detail}")
                    }
                    Msg::Verified { ok: true, .. } => {}
                    other => failures.push(format!("importer {i}: {other:?}")),
                }
            }
            Msg::Failed { error } => failures.push(format!("importer {i}: {error}")),
            other => failures.push(format!("importer {i}: unexpected {other:?}")),
        }
        importers.push(peer);
    }
    println!(
        "spawn→ready p50 {:.1} ms, import part p50 {:.1} ms, over {} importers",
        p50(spawn_ms),
        p50(import_ms),
        o.children
    );
    println!(
        "VRAM: owner + {} importers use {:.0} MiB; the weights {:.0} MiB",
        o.children,
        mib(last_used),
        mib(manifest.arenas.iter().map(|a| a.size).sum())
    );

    // 3. A wrong digest is refused.
    let mut tampered = manifest.clone();
    tampered.content_digest = backend::digest_bytes(&[b"not these weights"]);
    let mut peer = d.spawn("import", Some(&tampered), &handles)?;
    match receive(&mut peer, Duration::from_secs(120))? {
        Msg::Failed { error } if error.contains("digest mismatch") => {
            println!("digest check: a manifest with a wrong digest is refused ({error})")
        }
        other => failures.push(format!("a wrong digest was not refused: {other:?}")),
    }
    drop(peer);

    // 4. Owner death.
    if manifest.ipc == zygote_runtime::protocol::Ipc::Vmm {
        let _ = owner.child.kill();
        let _ = owner.child.wait();
        drop(owner);
        println!("owner killed with SIGKILL");
        for (i, peer) in importers.iter_mut().enumerate() {
            frame::write_frame(&mut peer.stream, &Msg::Verify).map_err(|e| e.to_string())?;
            match receive(peer, Duration::from_secs(120))? {
                Msg::Verified { ok: true, detail } => {
                    println!("importer {i} after the owner's death: {detail}")
                }
                other => failures.push(format!("importer {i} after the owner's death: {other:?}")),
            }
        }
        let t0 = Instant::now();
        let mut late = d.spawn("import", Some(&manifest), &handles)?;
        match receive(&mut late, Duration::from_secs(120))? {
            Msg::Ready { .. } => println!(
                "a new importer with no owner alive: ready in {:.1} ms from the kept fds",
                t0.elapsed().as_secs_f64() * 1e3
            ),
            other => failures.push(format!("import with no owner alive: {other:?}")),
        }
        importers.push(late);
        let mut adopter = d.spawn("adopt", Some(&manifest), &handles)?;
        match receive(&mut adopter, Duration::from_secs(120))? {
            Msg::Adopted {
                generation,
                adopt_ms,
            } => println!(
                "a new owner adopted generation {generation} in {adopt_ms:.0} ms without uploading"
            ),
            other => failures.push(format!("adoption failed: {other:?}")),
        }
        frame::write_frame(&mut adopter.stream, &Msg::Verify).map_err(|e| e.to_string())?;
        match receive(&mut adopter, Duration::from_secs(30))? {
            Msg::Verified { ok: true, detail } => println!("the new owner: {detail}"),
            other => failures.push(format!("the new owner: {other:?}")),
        }
        drop(adopter);
    } else {
        println!("legacy IPC: the weights die with the owner; workers restart with a new owner");
        drop(owner);
    }
    drop(importers);

    let me = std::process::id() as i32;
    let clean = !procfs::maps_contain(me, "libcuda").unwrap_or(true);
    println!(
        "this process (the zygote's part) has libcuda mapped: {}",
        if clean { "no" } else { "YES" }
    );
    if !clean {
        failures.push("the driver process mapped libcuda".into());
    }
    if failures.is_empty() {
        println!("all checks passed");
        Ok(ExitCode::SUCCESS)
    } else {
        for f in &failures {
            println!("FAILED: {f}");
        }
        Ok(ExitCode::FAILURE)
    }
}

// ---------------------------------------------------------------------------------------------
// The children: the only processes here that load CUDA.

/// What a child keeps alive while it serves.
enum Held {
    Nothing,
    Owner(CudaBackend),
    Weights(backend::Weights),
}

type Answer = Result<(Msg, Vec<OwnedFd>, Held), String>;

fn child_main(role: &str, socket: &Path) -> Result<ExitCode, String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let start: Msg = frame::read_frame(&mut stream, Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?
        .ok_or("no start message")?;
    let Msg::Start {
        model_path,
        model_digest,
        device,
        ipc,
        manifest,
        fds,
    } = start
    else {
        return Err(format!("expected start, got {start:?}"));
    };
    let model_fd = fdpass::recv_fd(stream.as_fd()).map_err(|e| e.to_string())?;
    let handles: Vec<OwnedFd> = (0..fds)
        .map(|_| fdpass::recv_fd(stream.as_fd()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let model = Model::from_memfd(model_fd, Path::new(&model_path), &model_digest)
        .map_err(|e| e.to_string())?;
    let ipc: IpcChoice = ipc.parse()?;
    let answer = match role {
        "owner" => owner(&model, device, ipc),
        "adopt" => adopt(&model, device, manifest, handles),
        "import" => import(manifest, handles, &model),
        other => Err(format!("unknown role {other}")),
    };
    let (msg, out_fds, held) =
        answer.unwrap_or_else(|error| (Msg::Failed { error }, Vec::new(), Held::Nothing));
    frame::write_frame(&mut stream, &msg).map_err(|e| e.to_string())?;
    fdpass::send_fds(stream.as_fd(), &out_fds).map_err(|e| e.to_string())?;
    serve(&mut stream, &held, &model);
    Ok(ExitCode::SUCCESS)
}

/// Answers the driver's requests until it closes the connection, keeping `held` alive.
fn serve(stream: &mut UnixStream, held: &Held, model: &Model) {
    loop {
        let request = match frame::read_frame::<_, Msg>(stream, None) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return,
        };
        let weights = match held {
            Held::Weights(w) => w.as_cuda(),
            Held::Owner(_) | Held::Nothing => None,
        };
        let (ok, detail) = match (request, weights, held) {
            (Msg::Verify, Some(w), _) => match w.verify() {
                Ok(()) => (true, "the device digest still matches".to_string()),
                Err(e) => (false, e.to_string()),
            },
            (Msg::Compare, Some(w), _) => compare_with_host(model, w),
            (Msg::Verify, None, Held::Owner(b)) => (
                true,
                format!("owner holds generations {:?}", b.generations()),
            ),
            (other, _, _) => (false, format!("cannot answer {other:?} here")),
        };
        if frame::write_frame(stream, &Msg::Verified { ok, detail }).is_err() {
            return;
        }
    }
}

fn owner(model: &Model, device: u32, ipc: IpcChoice) -> Answer {
    let mut backend = match CudaBackend::new(device, ipc) {
        Ok(b) => b,
        Err(BackendError::CudaUnavailable(why)) => {
            let reason = why.to_string();
            return Ok((Msg::Unavailable { reason }, Vec::new(), Held::Nothing));
        }
        Err(e) => return Err(e.to_string()),
    };
    let mem = |b: &CudaBackend| {
        b.context()
            .mem_get_info()
            .map(|(free, total)| ((total - free) as u64, total as u64))
            .map_err(|e| format!("cuMemGetInfo: {e:?}"))
    };
    let (vram_before, vram_total) = mem(&backend)?;
    let t0 = Instant::now();
    let export = backend.export(model, 1).map_err(|e| e.to_string())?;
    let export_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (vram_after, _) = mem(&backend)?;
    let msg = Msg::Exported {
        manifest: export.manifest,
        fds: export.fds.len() as u32,
        export_ms,
        vram_before,
        vram_after,
        vram_total,
    };
    Ok((msg, export.fds, Held::Owner(backend)))
}

fn adopt(model: &Model, device: u32, manifest: Option<Manifest>, handles: Vec<OwnedFd>) -> Answer {
    let manifest = manifest.ok_or("adopt needs a manifest")?;
    let mut backend = CudaBackend::new(device, IpcChoice::Vmm).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let export = backend
        .adopt(manifest, handles, model)
        .map_err(|e| e.to_string())?;
    let msg = Msg::Adopted {
        generation: export.manifest.generation,
        adopt_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    Ok((msg, Vec::new(), Held::Owner(backend)))
}

fn import(manifest: Option<Manifest>, handles: Vec<OwnedFd>, model: &Model) -> Answer {
    let manifest = manifest.ok_or("import needs a manifest")?;
    let weights = backend::import(manifest, handles, model).map_err(|e| e.to_string())?;
    let w = weights
        .as_cuda()
        .ok_or("the weights are not CUDA weights")?;
    let t = w.timings();
    let (free, total) = w.mem_info().map_err(|e| e.to_string())?;
    let msg = Msg::Ready {
        context_ms: t.context.as_secs_f64() * 1e3,
        map_ms: t.map.as_secs_f64() * 1e3,
        digest_ms: t.digest.as_secs_f64() * 1e3,
        read_only: w.read_only(),
        vram_used: total - free,
    };
    Ok((msg, Vec::new(), Held::Weights(weights)))
}

/// Reads up to 4 Mi elements of the last tensor back through cudarc, with our view as its
/// `DevicePtr`, and compares them bit for bit with the host backend's conversion of the model.
fn compare_with_host(model: &Model, w: &cuda::CudaWeights) -> (bool, String) {
    let Some(t) = model
        .tensors()
        .iter()
        .rev()
        .find(|t| backend::host::widened_dtype(t.dtype) == Dtype::F32)
    else {
        return (true, "no f32 tensor to compare".into());
    };
    let stream = w.context().default_stream();
    let view = match w.view::<f32>(&t.name, &stream) {
        Ok(v) => v,
        Err(e) => return (false, format!("no view: {e}")),
    };
    let n = view.len().min(4 << 20);
    let Some(view) = view.slice(0..n) else {
        return (false, "slicing the view failed".into());
    };
    let device: Vec<f32> = match stream.clone_dtoh(&view) {
        Ok(v) => v,
        Err(e) => return (false, format!("clone_dtoh failed: {e:?}")),
    };
    let src_len = n * t.dtype.size();
    let mut host = vec![0u8; n * 4];
    backend::host::widen_into(t.dtype, &model.data(t)[..src_len], &mut host);
    let same = host
        .chunks_exact(4)
        .zip(&device)
        .all(|(h, d)| h == d.to_le_bytes());
    let what = format!(
        "{n} elements of {} ({} in the file)",
        t.name,
        t.dtype.as_str()
    );
    if same {
        (
            true,
            format!("matches the host compute copy: {what}, read through cudarc"),
        )
    } else {
        (false, format!("DIFFERS from the host compute copy: {what}"))
    }
}
