//! Real PostgreSQL servers for tests, from the Debian `postgresql` package:
//! `initdb` and `pg_ctl` into a temporary directory, on a free loopback
//! port, fsync on. A primary can get synchronous standbys
//! (`pg_basebackup -R`), be killed, restarted and replaced by a promoted
//! standby. Self-contained (no other support module), so the store's unit
//! tests include it too.
//!
//! PostgreSQL refuses to run as root: as root, the data directory belongs
//! to `postgres` and every server command runs through `runuser`. A
//! watchdog process stops the server if the test process dies without
//! dropping it (a panic in another thread, a CI timeout).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Where the Debian package puts the server binaries.
const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PgServer {
    pub port: u16,
    pub data: PathBuf,
    /// Holds the data directory and the socket; removed on drop.
    root: PathBuf,
    /// The application name a standby connects to its primary with.
    pub name: String,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A server command, as `postgres` when we are root.
fn pg_command(tool: &str) -> Command {
    let path = format!("{BIN}/{tool}");
    assert!(
        Path::new(&path).exists(),
        "{path} is missing: install PostgreSQL 15 server binaries (`apt-get install -y postgresql`; .ci/run does it)"
    );
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn new_root(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let root = std::env::temp_dir().join(format!("rulehook-pg-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("create the server's directory");
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["postgres:postgres", root.to_str().expect("utf-8")]);
                c
            },
            "chown the server's directory to postgres",
        );
    }
    root
}

impl PgServer {
    /// A fresh primary with `initdb`, started and accepting connections.
    pub fn start(name: &str) -> PgServer {
        let root = new_root(name);
        let data = root.join("data");
        let mut c = pg_command("initdb");
        c.args([
            "-D",
            data.to_str().expect("utf-8"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-instructions",
            "-E",
            "UTF8",
        ]);
        run(c, "initdb");
        let server = PgServer {
            port: free_port(),
            data,
            root,
            name: name.replace('-', "_"),
        };
        server.configure(&[
            // Replication needs these even when a test adds no standby.
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_connections = 200",
        ]);
        server.start_again();
        server.watchdog();
        server
    }

    /// A standby of `primary` from `pg_basebackup -R`, streaming under
    /// `name` as its application name, started.
    pub fn standby_of(primary: &PgServer, name: &str) -> PgServer {
        let root = new_root(name);
        let data = root.join("data");
        let mut c = pg_command("pg_basebackup");
        c.args([
            "-D",
            data.to_str().expect("utf-8"),
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
        ]);
        run(c, "pg_basebackup");
        let server = PgServer {
            port: free_port(),
            data,
            root,
            name: name.replace('-', "_"),
        };
        // -R wrote primary_conninfo; name this standby in it, so the
        // primary's synchronous_standby_names can list it.
        server.configure(&[&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={}'",
            primary.port, server.name
        )]);
        server.start_again();
        server.watchdog();
        server
    }

    /// Makes commits wait for `n` of `standbys` to flush them.
    pub fn require_sync_standbys(&self, n: usize, standbys: &[&PgServer]) {
        let names: Vec<&str> = standbys.iter().map(|s| s.name.as_str()).collect();
        self.configure(&[&format!(
            "synchronous_standby_names = 'ANY {n} ({})'",
            names.join(", ")
        )]);
        self.sql("SELECT pg_reload_conf()");
    }

    /// Adds lines to `postgresql.auto.conf` (read at the next start or
    /// `pg_reload_conf()`).
    pub fn configure(&self, lines: &[&str]) {
        let conf = self.data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        // Written as root, read by postgres: keep it readable.
        std::fs::write(&conf, text).expect("write postgresql.auto.conf");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres:postgres", conf.to_str().expect("utf-8")]);
                    c
                },
                "chown postgresql.auto.conf",
            );
        }
    }

    /// Starts the server on its port (after `stop`, `kill` or at first).
    pub fn start_again(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=on",
            self.port,
            self.root.display()
        );
        let mut c = pg_command("pg_ctl");
        c.args([
            "-D",
            self.data.to_str().expect("utf-8"),
            "-o",
            &opts,
            "-l",
            self.root.join("log").to_str().expect("utf-8"),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        run(c, "pg_ctl start");
    }

    /// A clean stop (`pg_ctl stop -m fast`).
    pub fn stop(&self) {
        let mut c = pg_command("pg_ctl");
        c.args([
            "-D",
            self.data.to_str().expect("utf-8"),
            "-m",
            "fast",
            "-w",
            "stop",
        ]);
        let _ = c.stdin(Stdio::null()).output();
    }

    /// kill -9 of the postmaster and every backend, as a crash would.
    pub fn kill(&self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            // Backends notice their postmaster died on their own; make sure.
            let _ = Command::new("pkill")
                .args(["-9", "-P", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Command::new("kill")
                .args(["-0", &pid.to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Turns a standby into a primary.
    pub fn promote(&self) {
        let mut c = pg_command("pg_ctl");
        c.args(["-D", self.data.to_str().expect("utf-8"), "-w", "promote"]);
        run(c, "pg_ctl promote");
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Runs SQL with `psql` against the `postgres` database; its output.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("psql runs (postgresql-client)");
        assert!(
            out.status.success(),
            "psql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The server's log so far (`pg_ctl -l`), for a bench that reports
    /// what the server did meanwhile (checkpoints, restartpoints).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("log")).unwrap_or_default()
    }

    /// A new empty database; its connection string.
    pub fn create_db(&self, name: &str) -> String {
        self.sql(&format!("CREATE DATABASE {name}"));
        self.url(name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Stops the server if this process goes away without dropping it.
    fn watchdog(&self) {
        let me = std::process::id();
        let ctl = format!("{BIN}/pg_ctl");
        let stop = if is_root() {
            format!(
                "runuser -u postgres -- {ctl} -D {} -m immediate stop",
                self.data.display()
            )
        } else {
            format!("{ctl} -D {} -m immediate stop", self.data.display())
        };
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {}",
            self.root.display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut c = pg_command("pg_ctl");
        c.args([
            "-D",
            self.data.to_str().expect("utf-8"),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
        let _ = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// One server shared by the tests that run at the same time, each in a
/// database of its own; stopped when the last of them lets go.
pub fn shared() -> Arc<PgServer> {
    static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = slot.upgrade() {
        return s;
    }
    let s = Arc::new(PgServer::start("shared"));
    *slot = Arc::downgrade(&s);
    s
}

/// A server that lives as long as the test process (its watchdog stops it
/// when the process ends), for databases that must outlive every handle a
/// test holds: the postgres mode of the whole suite, where a test stops a
/// rulehook server and starts it again on the same data.
pub fn for_process() -> &'static PgServer {
    static SERVER: std::sync::OnceLock<PgServer> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| PgServer::start("suite"))
}

/// A fresh database on the shared server: its connection string, and the
/// server to keep alive while it is used.
pub fn fresh_db(prefix: &str) -> (Arc<PgServer>, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let server = shared();
    let url = server.create_db(&format!("{}_{n}", prefix.replace('-', "_")));
    (server, url)
}
