//! `multidb bench fleet`: `restore --all` of a fleet of small databases beside what a user
//! scripts today, a loop of single `multidb restore` processes over the same replica, from a
//! directory replica and from a local S3 server (`moto_server`), with the peak RSS of
//! `restore --all`. Both sides run as processes started the same way, in the same run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::run_measured;
use crate::cli::generate::{self, Layout};
use crate::config::Config;
use crate::replica::{ReplicaClient, ReplicaUrl};

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Fleet sizes in databases, multiples of 1000 (10 projects × 10 databases × 10 branches ×
    /// N/1000 tenants)
    #[arg(long, value_delimiter = ',', default_value = "2000,10000")]
    pub sizes: Vec<usize>,
    /// Where trees, replicas and restores go (trees and replicas are kept for later runs)
    #[arg(long, default_value = "target/bench-fleet")]
    pub dir: PathBuf,
    /// Databases restored by the loop of single processes; above this the loop runs over an
    /// even sample and its time is extrapolated per database
    #[arg(long, default_value_t = 1000)]
    pub loop_sample: usize,
    /// `--jobs` of `restore --all`
    #[arg(long, default_value_t = crate::cli::fleet::DEFAULT_JOBS)]
    pub jobs: usize,
    /// Skip the S3 figures
    #[arg(long)]
    pub no_s3: bool,
}

/// Keys for the local S3 server, which accepts any.
const BENCH_KEY_ID: &str = "AKIAMULTIDBBENCH0001";
const BENCH_SECRET: &str = "multidbBenchSecret";
const BUCKET: &str = "bench-fleet";

pub fn fleet(args: &FleetArgs) -> anyhow::Result<()> {
    if args.loop_sample == 0 || args.jobs == 0 {
        bail!("--loop-sample and --jobs must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the multidb binary")?;
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.canonicalize()?;
    let s3 = if args.no_s3 {
        None
    } else {
        let moto = Moto::start(&dir)?;
        for (k, v) in moto.env() {
            // `restore --all` runs under the measuring trampoline, which passes on this
            // process's environment; set while this process has no other thread.
            std::env::set_var(k, v);
        }
        Some(moto)
    };
    for &size in &args.sizes {
        if size < 1000 || size % 1000 != 0 {
            bail!("--sizes: {size} is not a positive multiple of 1000");
        }
        let root = dir.join(format!("tree-{size}"));
        let layout = Layout {
            projects: 10,
            databases: 10,
            branches: 10,
            tenants: size / 1000,
        };
        eprintln!("preparing {size} databases under {} ...", root.display());
        generate::generate(&root, &layout, true)?;
        let file_config = write_config(&dir, size, &root, None)?;
        let paths = prepare_file_replicas(&file_config, size)?;
        println!(
            "fleet restore: {size} small databases (10 projects x 10 databases x 10 branches x {} tenants, {} KiB each), restores to this machine's disk with fsync",
            size / 1000,
            std::fs::metadata(&paths[0])?.len() / 1024
        );
        let config = dir.join(format!("multidb-file-{size}.yml"));
        compare(
            &exe,
            &dir,
            &config,
            &file_config,
            &paths,
            args,
            "directory replica",
            &[],
        )?;
        if let Some(moto) = &s3 {
            let s3_config = write_config(&dir, size, &root, Some(moto))?;
            upload_to_s3(&file_config, &s3_config, &paths, moto)?;
            let config = dir.join(format!("multidb-s3-{size}.yml"));
            compare(
                &exe,
                &dir,
                &config,
                &s3_config,
                &paths,
                args,
                "S3 replica (moto_server on 127.0.0.1)",
                &moto.env(),
            )?;
        }
    }
    Ok(())
}

/// Writes and loads the configuration of one fleet: the seed's pattern over `root`, replicas
/// in a directory or in the local S3 server.
fn write_config(dir: &Path, size: usize, root: &Path, s3: Option<&Moto>) -> anyhow::Result<Config> {
    let pattern = generate::pattern_for(root);
    let (name, template) = match s3 {
        None => (
            format!("multidb-file-{size}.yml"),
            format!(
                "    type: file\n    path: \"{}/replica-{size}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
                dir.display()
            ),
        ),
        Some(moto) => (
            format!("multidb-s3-{size}.yml"),
            format!(
                "    type: s3\n    bucket: {BUCKET}\n    endpoint: {}\n    path: \"fleet-{size}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
                moto.endpoint()
            ),
        ),
    };
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("multi_db:\n  discovery_pattern: \"{pattern}\"\n  replica_template:\n{template}"),
    )?;
    Ok(Config::load(&path, None)?)
}

fn replica_of(config: &Config, db: &str) -> anyhow::Result<ReplicaUrl> {
    let pattern = &config.multi_db.pattern;
    let fields = pattern
        .parse(db)
        .map_err(|why| anyhow::anyhow!("{db}: {why}"))?;
    let template = config.multi_db.replica.as_ref().context("no template")?;
    Ok(template.url_for(&fields)?)
}

/// Replicates every database of the tree once, in this process, unless its replica exists.
/// Returns the database paths, sorted.
fn prepare_file_replicas(config: &Config, size: usize) -> anyhow::Result<Vec<String>> {
    let (arena, _) = crate::discover::discover(config)?;
    let mut paths: Vec<String> = arena.ids().map(|id| arena.path(id)).collect();
    paths.sort_unstable();
    if paths.len() != size {
        bail!("discovered {} databases, expected {size}", paths.len());
    }
    let tmp = std::env::temp_dir();
    let started = Instant::now();
    in_parallel(4, &paths, &|_, db| {
        let ReplicaUrl::File(location) = replica_of(config, db)? else {
            bail!("not a directory replica");
        };
        if location.join(crate::replica::IDENTITY_NAME).exists() {
            return Ok(());
        }
        let client = ReplicaUrl::File(location).client()?;
        let options = crate::replicate::RunOptions {
            once: true,
            poll: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            litestream_compatible: false,
            previous_lease: crate::replica::lease::Previous::None,
        };
        crate::replicate::run_with(
            Path::new(db),
            client,
            &tmp,
            None,
            options,
            &|| false,
            &mut |_| {},
        )?;
        Ok(())
    })?;
    eprintln!(
        "  directory replicas ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(paths)
}

/// Copies each directory replica's files and identity to its S3 location (as `rclone copy`
/// would), unless its identity is there already.
fn upload_to_s3(
    file_config: &Config,
    s3_config: &Config,
    paths: &[String],
    moto: &Moto,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp = std::env::temp_dir().join(format!("multidb-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    in_parallel(8, paths, &|worker, db| {
        let ReplicaUrl::S3(location) = replica_of(s3_config, db)? else {
            bail!("not an S3 replica");
        };
        let s3 = crate::replica::s3::S3Replica::with_credentials(location, moto.credentials())?;
        let source = replica_of(file_config, db)?.client()?;
        let Some(body) = source.read_identity()? else {
            bail!("{db}: its directory replica has no identity");
        };
        if s3.read_identity()?.is_some() {
            return Ok(());
        }
        for f in crate::replicate::restore::list_all(source.as_ref())? {
            let src = source
                .local_path(f.level, f.min_txid, f.max_txid)
                .context("a directory replica has local paths")?;
            // `put` may consume its source: hand it a copy.
            let copy = tmp.join(format!("{worker}.ltx"));
            std::fs::copy(&src, &copy)?;
            s3.put(f.level, f.min_txid, f.max_txid, &copy)?;
        }
        s3.create_identity(&body)?;
        Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "  S3 replicas ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `work(thread, path)` for every path on `threads` threads; the first error ends it.
fn in_parallel(
    threads: usize,
    paths: &[String],
    work: &(dyn Fn(usize, &String) -> anyhow::Result<()> + Sync),
) -> anyhow::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let next = &next;
                scope.spawn(move || -> anyhow::Result<()> {
                    // A line per snapshot or upload would bury the figures.
                    let _quiet = tracing::subscriber::set_default(
                        tracing::subscriber::NoSubscriber::default(),
                    );
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = paths.get(i) else {
                            return Ok(());
                        };
                        work(thread, path)?;
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))??;
        }
        Ok(())
    })
}

/// Times `restore --all` and the loop over the same replica, and prints both with the ratio.
#[allow(clippy::too_many_arguments)]
fn compare(
    exe: &Path,
    dir: &Path,
    config_path: &Path,
    config: &Config,
    paths: &[String],
    args: &FleetArgs,
    what: &str,
    env: &[(&str, String)],
) -> anyhow::Result<()> {
    let size = paths.len();
    let out = dir.join("restored");
    remove(&out)?;
    let config_arg = config_path.to_str().context("path is not UTF-8")?;
    let out_arg = out.to_str().context("path is not UTF-8")?;
    let jobs = args.jobs.to_string();
    let (all_time, all_rss) = run_measured(
        exe,
        exe,
        &[
            "--config", config_arg, "restore", "--all", "--to", out_arg, "--jobs", &jobs,
        ],
    )?;
    let restored = count_files(&out)?;
    if restored != size {
        bail!("restore --all restored {restored} of {size} databases");
    }
    remove(&out)?;

    // The loop a user scripts: one process per database, one after another.
    let step = size.div_ceil(args.loop_sample.min(size));
    let sample: Vec<&String> = paths.iter().step_by(step).collect();
    let root = config.multi_db.pattern.root();
    let started = Instant::now();
    for db in &sample {
        let url = match replica_of(config, db)? {
            ReplicaUrl::File(path) => format!("file://{}", path.display()),
            ReplicaUrl::S3(location) => format!(
                "s3://{BUCKET}/{}?endpoint={}",
                location.prefix,
                location.endpoint.unwrap_or_default()
            ),
        };
        let output = out.join(db.strip_prefix(root).unwrap_or(db).trim_start_matches('/'));
        if let Some(parent) = output.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let status = Command::new(exe)
            .arg("restore")
            .arg("-o")
            .arg(&output)
            .arg(&url)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("multidb restore -o {} {url} failed", output.display());
        }
    }
    let loop_time = started.elapsed();
    remove(&out)?;
    let per_db_loop = loop_time.as_secs_f64() / sample.len() as f64;
    let loop_total = per_db_loop * size as f64;
    let sampled = if sample.len() < size {
        format!(
            "timed over {} of them (every {step}th), extrapolated",
            sample.len()
        )
    } else {
        "all of them".to_string()
    };
    println!("  {what}, {size} databases:");
    println!(
        "    restore --all --to DIR --jobs {:<3}        {:>9.1} s  ({:.2} ms per database), peak RSS {:.1} MB",
        args.jobs,
        all_time.as_secs_f64(),
        all_time.as_secs_f64() * 1e3 / size as f64,
        all_rss as f64 / 1048576.0
    );
    println!(
        "    baseline: loop of `multidb restore -o OUT URL`, one process per database, {sampled}: {:.1} s  ({:.2} ms per database)",
        loop_total,
        per_db_loop * 1e3
    );
    println!(
        "    restore --all is {:.1}x faster than the loop",
        loop_total / all_time.as_secs_f64()
    );
    Ok(())
}

fn remove(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

fn count_files(dir: &Path) -> anyhow::Result<usize> {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// A `moto_server` child on a free loopback port, with one bucket; killed when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start(dir: &Path) -> anyhow::Result<Moto> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let program = std::env::var_os("MOTO_SERVER").unwrap_or_else(|| "moto_server".into());
        let log = std::fs::File::create(dir.join("moto.log"))?;
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting moto_server (scripts/setup.sh installs it; or pass --no-s3)")?;
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(status) = moto.http("PUT", &format!("/{BUCKET}")) {
                if status == 200 {
                    return Ok(moto);
                }
                bail!("moto_server answered {status} to creating bucket {BUCKET}");
            }
            if Instant::now() > deadline {
                bail!("moto_server did not answer on 127.0.0.1:{port} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn credentials(&self) -> crate::replica::s3::S3Credentials {
        crate::replica::s3::S3Credentials::new(BENCH_KEY_ID, BENCH_SECRET, None)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", BENCH_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", BENCH_SECRET.to_string()),
        ]
    }

    /// One anonymous request (moto allows them); the HTTP status.
    fn http(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no HTTP status"))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
