"""How each benchmark target is started and stopped: megaphone (memory store, Redis store,
two nodes, two workers), its redis-server, nginx + nchan and pushpin with its GRIP origin; the
environment helpers they share (CPU pinning, file descriptor limit, free ports, the source's
git state). Used by ``run.py``, ``profile.py``, ``syscalls.py``, ``limits.py`` and ``client.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SERVER_CPU = 0
LOADGEN_CPU = 1
WANTED_NOFILE = 200_000
# megaphone: the memory store; megaphone-redis: one node on the Redis store;
# megaphone-redis-2n: two nodes on one Redis (writers on node A, readers on node B)
# megaphone-redis-w2: one node on the Redis store with workers = 2 (two processes on one port)
TARGETS = (
    "megaphone",
    "megaphone-redis",
    "megaphone-redis-2n",
    "megaphone-redis-w2",
    "nchan",
    "nchan-redis",
    "pushpin",
)
# megaphone on its Redis store
REDIS_TARGETS = ("megaphone-redis", "megaphone-redis-2n", "megaphone-redis-w2")
# every target with a redis-server beside it (its CPU is reported apart): nchan-redis is nginx +
# nchan with nchan_redis_pass, its channels and messages in Redis (issue #13's baseline)
REDIS_BACKED = (*REDIS_TARGETS, "nchan-redis")
NCHAN_TARGETS = ("nchan", "nchan-redis")
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_MAPPING = {
    "megaphone-redis": "one megaphone node on the Redis store: creates, writes and reads on it",
    "megaphone-redis-2n": "two megaphone nodes on one redis-server, same prefix: channels created "
    "and written on node A, read on node B (every event crosses nodes through Redis); the create "
    "workload spreads its connections over both nodes",
    "megaphone-redis-w2": "one megaphone node on the Redis store with workers = 2: two worker "
    "processes on one port (SO_REUSEPORT), each connection served by one of them; the workers "
    "may run on CPU 0 and CPU 1, so they share CPU 1 with the load generator",
    "nchan-redis": "nginx + nchan storing channels and messages in a redis-server "
    "(nchan_redis_pass): publishes and subscribers on the one nginx",
    "placement": "the server(s) and redis-server on CPU 0, the load generator alone on CPU 1",
}
REDIS_PREFIX = "bench:"
# redis-server's log lines (at --loglevel warning) that every start and stop prints
REDIS_ROUTINE_LOG = (
    "Redis is starting",
    "Redis version=",
    "Configuration loaded",
    "Server initialized",
    "overcommit",
    "Received SIGTERM",
    "User requested shutdown",
    "ready to exit",
)
NCHAN_MODULE_DIRS = (Path("/usr/lib/nginx/modules"), Path("/usr/share/nginx/modules"))


# --- environment ----------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE as far as allowed; children (servers, load generator) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (WANTED_NOFILE, hard):
        if limit == resource.RLIM_INFINITY or limit < soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_busy_pct(seconds: float = 1.0) -> float:
    """CPU busy on the whole machine (% of one core) over ``seconds``, from /proc/stat."""

    def busy() -> int:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # minus idle and iowait

    before, start = busy(), time.monotonic()
    time.sleep(seconds)
    after, wall = busy(), time.monotonic() - start
    return 100 * (after - before) / os.sysconf("SC_CLK_TCK") / wall


def git_state() -> str:
    repo = BENCH.parent
    head = command_output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(repo), "status", "--porcelain", "--", "src"])
    changed = [line for line in dirty.splitlines() if line.strip() and dirty != "unknown"]
    if not changed:
        return head
    # a digest of the uncommitted source, so two runs (or a run's start and end) can be compared
    diff = subprocess.run(
        ["git", "-C", str(repo), "diff", "HEAD", "--", "src"], capture_output=True, check=False
    ).stdout
    digest = hashlib.sha256(diff).hexdigest()[:8]
    return f"{head} + {len(changed)} uncommitted change(s) under src/ (diff {digest})"


def command_output(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout + done.stderr).strip() or "unknown"


def pinned(cpu: int) -> list[str]:
    """``taskset -c <cpu>`` when pinning is possible (taskset present, enough CPUs)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > max(SERVER_CPU, LOADGEN_CPU):
        return ["taskset", "-c", str(cpu)]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during startup")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server not listening on {port} after {timeout}s")


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_bytes()
            if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def nofile_limit(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    return "unknown"


def clean_env() -> dict[str, str]:
    """Our environment minus ``megaphone_*`` overrides, so every run uses the same settings."""
    return {k: v for k, v in os.environ.items() if not k.lower().startswith("megaphone_")}


# --- servers --------------------------------------------------------------------------------


@dataclass
class Server:
    """One server process (nginx: the master; its worker is in ``pids`` too)."""

    kind: str  # megaphone | nchan | redis
    name: str  # how problems name it: "megaphone", "megaphone node B", "nginx", "redis-server"
    proc: subprocess.Popen[bytes]
    port: int
    pids: list[int]  # processes whose CPU and RSS count as this server's
    log: Path
    nofile: str


@dataclass
class Deployment:
    """What a workload runs against: the HTTP node(s), any redis-server, which node does what."""

    target: str
    nodes: list[Server]  # megaphone nodes (A, B, ...) or nginx
    redis: Server | None = None
    read: int = 0  # the readers' node (index into nodes)
    write: int = 0  # the writers' node
    create: int = 0  # where the channels are created
    publish_port: int | None = None  # pushpin: writes go to its control port
    helpers: list[Server] = dataclasses.field(default_factory=list)  # pushpin: its origin

    def server_pids(self) -> list[int]:
        """Every process whose CPU and RSS count as the server's."""
        return [pid for node in [*self.nodes, *self.helpers] for pid in node.pids]

    def job(self) -> dict[str, Any]:
        """The load generator's view: ports by role, and the PIDs whose CPU it samples."""
        job: dict[str, Any] = {
            "target": self.nodes[0].kind,  # the protocol: megaphone, nchan or pushpin
            "target_name": self.target,
            "port": self.nodes[self.read].port,
            "write_port": self.publish_port or self.nodes[self.write].port,
            "create_port": self.nodes[self.create].port,
            "node_ports": [node.port for node in self.nodes],
            "server_pids": self.server_pids(),
        }
        if len(self.nodes) > 1:
            job["node_pids"] = {NODE_NAMES[i]: node.pids for i, node in enumerate(self.nodes)}
        if self.redis is not None:
            job["redis_pids"] = self.redis.pids
        return job

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "server_pids": self.server_pids(),
            "server_nofile": self.nodes[0].nofile,
        }
        if self.helpers:
            out["server_processes"] = {
                pid: command_output(["cat", f"/proc/{pid}/comm"]) for pid in self.server_pids()
            }
        if len(self.nodes) > 1:
            out["nodes"] = {
                NODE_NAMES[i]: {
                    "pids": node.pids,
                    "roles": [
                        role
                        for role, index in (
                            ("create", self.create),
                            ("write", self.write),
                            ("read", self.read),
                        )
                        if index == i
                    ],
                }
                for i, node in enumerate(self.nodes)
            }
        if self.redis is not None:
            out["redis_pids"] = self.redis.pids
            out["redis_nofile"] = self.redis.nofile
        return out


NODE_NAMES = "ABCDEFGH"
# starts a target's processes, appending each to the list as soon as it runs (to stop them all
# whatever happens next)
Starter = Callable[[Path, Sequence[str], list[Server]], Deployment]


def megaphone_executable() -> str:
    beside = Path(sys.executable).parent / "megaphone"
    found = str(beside) if beside.exists() else shutil.which("megaphone")
    if not found:
        raise RuntimeError("the `megaphone` console script is not installed")
    return found


def start_megaphone_node(
    workdir: Path,
    extra: Sequence[str] = (),
    name: str = "megaphone",
    pin: Sequence[str] | None = None,
) -> Server:
    """One node, pinned to SERVER_CPU unless ``pin`` says otherwise (a taskset command)."""
    port = free_port()
    log = workdir / f"{name.replace(' ', '-')}.log"
    cmd = [
        *(pinned(SERVER_CPU) if pin is None else pin),
        megaphone_executable(),
        "--address",
        f"127.0.0.1:{port}",
        "--poll-duration-millis",
        "600000",
        "--log-level",
        "warning",
        # the idle workloads hold 10,000+ readers (default max_connections: 10,000)
        *(
            ["--max-connections", str(WANTED_NOFILE)]
            if megaphone_has_flag("--max-connections")
            else []
        ),
        *extra,
    ]
    with open(log, "wb") as out:
        # cwd = the temp dir, so no megaphone.{toml,yaml,json} from elsewhere is picked up
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=clean_env()
        )
    return Server("megaphone", name, proc, port, [proc.pid], log, "unknown")


def wait_ready(server: Server) -> None:
    """Wait until the server listens; then read the file limit it runs with."""
    wait_listening(server.port, server.proc)
    server.nofile = nofile_limit(server.pids[-1])


def start_megaphone(workdir: Path, extra: Sequence[str], started: list[Server]) -> Deployment:
    """megaphone on its memory store."""
    node = start_megaphone_node(workdir, extra)
    started.append(node)
    wait_ready(node)
    return Deployment("megaphone", [node])


def start_redis(workdir: Path) -> Server:
    """A private redis-server on a free loopback port: no persistence, log in ``workdir``."""
    port = free_port()
    log = workdir / "redis.log"
    cmd = [
        *pinned(SERVER_CPU),
        REDIS_SERVER,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(workdir),
        "--logfile",
        str(log),
        "--loglevel",
        "warning",
    ]
    with open(workdir / "redis.out", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    return Server("redis", "redis-server", proc, port, [proc.pid], log, "unknown")


@functools.cache
def megaphone_has_flag(flag: str) -> bool:
    help_text = command_output([megaphone_executable(), "--help"])
    return re.search(rf"(^|\s){re.escape(flag)}[\s,=]", help_text) is not None


def redis_node_args(workdir: Path, redis_port: int) -> list[str]:
    """megaphone's settings for the Redis store (``--store`` by a config file when the command
    has no such flag)."""
    args = ["--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--redis-prefix", REDIS_PREFIX]
    if megaphone_has_flag("--store"):
        return ["--store", "redis", *args]
    config = workdir / "megaphone.toml"
    config.write_text('store = "redis"\n')
    return ["--config", str(config), *args]


def listeners(port: int) -> int:
    """How many sockets listen on ``port`` (IPv4): one per worker with SO_REUSEPORT."""
    count = 0
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, _, state = line.split()[1:4]
            count += local.endswith(f":{port:04X}") and state == "0A"
    return count


def wait_workers(server: Server, workers: int, timeout: float = 30.0) -> None:
    """Wait until every worker listens; the workers' CPU and RSS count as the node's."""
    deadline = time.monotonic() + timeout
    while listeners(server.port) < workers:
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{server.name}: {workers} workers not listening after {timeout}s")
        time.sleep(0.05)
    server.pids = [server.proc.pid, *child_pids(server.proc.pid)]


def redis_starter(nodes: int, workers: int = 1) -> Starter:
    """megaphone on the Redis store, ``nodes`` nodes on one redis-server (same prefix). With two
    nodes, channels are created and written on node A and read on node B: every event crosses
    from one node to the other through Redis. ``workers`` > 1: each node runs that many worker
    processes (``--workers``), allowed on SERVER_CPU and LOADGEN_CPU."""

    def start(workdir: Path, extra: Sequence[str], started: list[Server]) -> Deployment:
        redis = start_redis(workdir)
        started.append(redis)
        wait_ready(redis)
        args = [*redis_node_args(workdir, redis.port), *extra]
        pin = None
        if workers > 1:
            args += ["--workers", str(workers)]
            cores = pinned(SERVER_CPU)
            pin = [*cores[:-1], f"{SERVER_CPU},{LOADGEN_CPU}"] if cores else []
        servers = []
        for number in range(nodes):
            name = f"megaphone node {NODE_NAMES[number]}" if nodes > 1 else "megaphone"
            servers.append(start_megaphone_node(workdir, args, name, pin))
            started.append(servers[-1])
        for server in servers:
            wait_ready(server)
            if workers > 1:
                wait_workers(server, workers)
        target = "megaphone-redis" if nodes == 1 else f"megaphone-redis-{nodes}n"
        if workers > 1:
            target += f"-w{workers}"
        read = 1 if nodes > 1 else 0
        return Deployment(target, servers, redis, read=read, write=0, create=0)

    return start


def nchan_module() -> Path | None:
    for directory in NCHAN_MODULE_DIRS:
        candidate = directory / "ngx_nchan_module.so"
        if candidate.exists():
            return candidate
    return None


def apt_install(packages: Sequence[str], ready: Callable[[], bool], install: bool) -> str | None:
    """None when ``ready()``, else install ``packages`` with apt-get (if allowed) and check
    again; the reason when it is still not usable."""
    if ready():
        return None
    what = " + ".join(packages)
    if not install:
        return f"{what} not installed (and --no-install given)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{what} not installed and cannot apt-get install it (need root + apt-get)"
    print(f"installing {what} with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}"
    return None if ready() else f"installed {what} but it is still not usable"


def ensure_nchan(install: bool) -> str | None:
    """None when nginx + nchan are usable (installs them with apt-get if allowed), else why not."""
    return apt_install(
        ["nginx", "libnginx-mod-nchan"],
        lambda: bool(shutil.which("nginx") and nchan_module()),
        install,
    )


def ensure_redis(install: bool) -> str | None:
    """None when redis-server is usable (installs it with apt-get if allowed), else why not."""
    return apt_install(["redis-server"], lambda: Path(REDIS_SERVER).exists(), install)


def ensure_pushpin(install: bool) -> str | None:
    """None when pushpin (with condure and zurl) is usable, else why not."""
    return apt_install(
        ["pushpin"], lambda: all(shutil.which(b) for b in ("pushpin", "condure", "zurl")), install
    )


NGINX_CONF = """\
load_module {module};
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_buffer_size 16k;
    large_client_header_buffers 4 16k;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        # publisher: POST a message; megaphone's POST /write/{{producer}}/{{stream}}
        location ~ ^/pub/(\\w+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 100;
            nchan_message_timeout 10m;
        }}
        # subscriber: one message per line; megaphone's GET /read/{{consumer}}
        location ~ ^/sub/(\\w+)$ {{
            nchan_subscriber http-raw-stream;
            nchan_channel_id $1;
            nchan_subscriber_timeout 0;
        }}
        # one publish into up to 255 channels (workload batch): POST /mpub/a,b,c
        location ~ ^/mpub/([\\w,]+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_channel_id_split_delimiter ",";
            nchan_max_channel_id_length 8192;  # the whole list, before it is split (1,024)
            nchan_message_buffer_length 100;
            nchan_message_timeout 10m;
        }}
        # resumable subscriber (churn): Last-Event-ID / ?last_event_id=, from the buffer
        location ~ ^/ev/(\\w+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_subscriber_timeout 0;
        }}
        # WebSocket subscriber (workload websocket): one text frame per message
        location ~ ^/ws/(\\w+)$ {{
            nchan_subscriber websocket;
            nchan_channel_id $1;
            nchan_subscriber_timeout 0;
        }}
    }}
}}
"""


def nchan_on_redis(conf: str, redis_port: int) -> str:
    """The nchan configuration with every publisher and subscriber location on Redis."""
    upstream = (
        "    upstream megaphone_bench_redis {\n"
        f"        nchan_redis_server redis://127.0.0.1:{redis_port};\n"
        "    }\n"
    )
    conf = conf.replace("http {\n", "http {\n" + upstream, 1)
    return re.sub(
        r"^(\s*)(nchan_(?:publisher|subscriber)\b[^;]*;)$",
        r"\1\2\n\1nchan_redis_pass megaphone_bench_redis;",
        conf,
        flags=re.MULTILINE,
    )


def start_nchan(
    workdir: Path, extra: Sequence[str], started: list[Server], redis: Server | None = None
) -> Deployment:
    module = nchan_module()
    if module is None:
        raise RuntimeError("ngx_nchan_module.so not found")
    port = free_port()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    conf = workdir / "nginx.conf"
    text = NGINX_CONF.format(
        module=module,
        dir=workdir,
        port=port,
        nofile=nofile,
        connections=max(1024, nofile - 100),
    )
    conf.write_text(text if redis is None else nchan_on_redis(text, redis.port))
    log = workdir / "error.log"
    cmd = [*pinned(SERVER_CPU), "nginx", "-e", str(log), "-p", str(workdir), "-c", str(conf)]
    with open(workdir / "nginx.out", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    server = Server("nchan", "nginx", proc, port, [proc.pid], log, "unknown")
    started.append(server)
    wait_listening(port, proc)
    workers: list[int] = []
    deadline = time.monotonic() + 5
    while not workers and time.monotonic() < deadline:
        workers = child_pids(proc.pid)
        time.sleep(0.05)
    if not workers:
        raise RuntimeError("nginx worker process not found")
    server.pids = [proc.pid, *workers]
    server.nofile = nofile_limit(workers[0])
    if redis is not None:
        return Deployment("nchan-redis", [server], redis)
    return Deployment("nchan", [server])


def start_nchan_redis(workdir: Path, extra: Sequence[str], started: list[Server]) -> Deployment:
    """nginx + nchan with its channels in a private redis-server (pinned like megaphone's)."""
    redis = start_redis(workdir)
    started.append(redis)
    wait_ready(redis)
    return start_nchan(workdir, extra, started, redis)


PUSHPIN_CONF = """\
[global]
include={{libdir}}/internal.conf
rundir={dir}/run
ipc_prefix=bench-
port_offset=0
stats_connection_ttl=120

[runner]
services=condure,zurl,pushpin-proxy,pushpin-handler
http_port=127.0.0.1:{port}
logdir={dir}/log
log_level=1
client_buffer_size=8192
client_maxconn={nofile}
condure_bin=condure
zurl_bin=zurl

[proxy]
routesfile={dir}/routes
# the runner's own zurl (internal.conf points at a system-wide one)
zurl_out_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in
zurl_out_stream_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in-stream
zurl_in_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-out
debug=false
auto_cross_origin=false
sig_iss=pushpin
sig_key=changeme
updates_check=off

[handler]
push_in_spec=tcp://127.0.0.1:{zmq_pull}
push_in_sub_specs=tcp://127.0.0.1:{zmq_sub}
push_in_sub_connect=false
push_in_http_addr=127.0.0.1
push_in_http_port={publish}
push_in_http_max_headers_size=10000
push_in_http_max_body_size=10000000
stats_spec=ipc://{{rundir}}/{{ipc_prefix}}stats
command_spec=tcp://127.0.0.1:{command}
# no rate limit: with one (default 2,500/s) pushpin 1.36's RateLimiter restarts its 25 ms batch
# timer on every publish, so a stream receiving events less than 25 ms apart gets nothing until
# the publishes pause; message_hwm: how many may queue per route (default 25,000)
message_rate=0
message_hwm=1000000
message_wait=5000
id_cache_ttl=60
connection_subscription_max=20
subscription_linger=60
stats_subscription_ttl=60
stats_report_interval=10
stats_format=tnetstring
"""
PUSHPIN_SERVICES = ("condure", "zurl", "pushpin-proxy", "pushpin-handler")


def start_pushpin(workdir: Path, extra: Sequence[str], started: list[Server]) -> Deployment:
    """pushpin (its runner and the four processes it starts) and the GRIP origin it routes
    every request to, all on CPU 0, loopback only, config and logs in ``workdir``."""
    origin_port = free_port()
    log = workdir / "origin.log"
    cmd = [*pinned(SERVER_CPU), sys.executable, str(BENCH / "grip_origin.py"), str(origin_port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    origin = Server("origin", "GRIP origin", proc, origin_port, [proc.pid], log, "unknown")
    started.append(origin)
    wait_ready(origin)

    port, publish, zmq_pull, zmq_sub, command = (free_port() for _ in range(5))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for sub in ("run", "log"):
        (workdir / sub).mkdir()
    (workdir / "routes").write_text(f"* 127.0.0.1:{origin_port}\n")
    conf = workdir / "pushpin.conf"
    conf.write_text(
        PUSHPIN_CONF.format(
            dir=workdir,
            port=port,
            publish=publish,
            zmq_pull=zmq_pull,
            zmq_sub=zmq_sub,
            command=command,
            nofile=max(1024, nofile - 100),
        )
    )
    log = workdir / "pushpin.log"
    cmd = [*pinned(SERVER_CPU), "pushpin", "--config", str(conf), "--merge-output"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    server = Server("pushpin", "pushpin", proc, port, [proc.pid], log, "unknown")
    started.append(server)
    wait_listening(port, proc)
    wait_listening(publish, proc)
    children: dict[int, str] = {}
    deadline = time.monotonic() + 10
    while len(children) < len(PUSHPIN_SERVICES) and time.monotonic() < deadline:
        children = {
            pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in child_pids(proc.pid)
        }
        time.sleep(0.05)
    missing = set(PUSHPIN_SERVICES) - {name[:15] for name in children.values()}
    if missing:
        raise RuntimeError(f"pushpin did not start {sorted(missing)} ({children})")
    server.pids = [proc.pid, *children]
    server.nofile = nofile_limit(next(p for p, n in children.items() if n == "condure"))
    return Deployment("pushpin", [server], publish_port=publish, helpers=[origin])


def stop(server: Server) -> tuple[list[str], float]:
    """SIGTERM the server's main PID, SIGKILL after 10 s: problems noticed, seconds it took."""
    problems: list[str] = []
    started = time.monotonic()
    name = server.name
    if server.proc.poll() is not None:
        problems.append(f"{name} had exited by itself (code {server.proc.returncode})")
    else:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            problems.append(f"{name} ignored SIGTERM for 10 s; killed")
            server.proc.kill()
            server.proc.wait()
        if server.proc.returncode not in (0, -signal.SIGTERM):
            problems.append(f"{name} exited with code {server.proc.returncode} after SIGTERM")
    for pid in server.pids[1:]:  # nginx workers go with their master
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    took = time.monotonic() - started
    problems.extend(log_problems(server))
    return problems, took


def log_problems(server: Server) -> list[str]:
    try:
        lines = server.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    if server.kind == "nchan":
        keep = ("[error]", "[crit]", "[alert]", "[emerg]")
        lines = [line for line in lines if any(level in line for level in keep)]
    if server.kind == "pushpin":  # log_level 1: warnings and errors, plus the runner's notes
        lines = [line for line in lines if line.startswith(("[ERR]", "[WARN]"))]
    if server.kind == "redis":  # --loglevel warning: all but the routine start and stop lines
        lines = [line for line in lines if not any(r in line for r in REDIS_ROUTINE_LOG)]
    # megaphone runs at --log-level warning: any output at all is worth a look. Lines that differ
    # only in their time stamp are counted together (first and last time shown).
    kinds: dict[str, list[Any]] = {}  # message -> [count, first time, last time]
    for line in lines:
        if not line.strip():
            continue
        stamp = LOG_STAMP.search(line)
        when = (stamp.group(1) or stamp.group(2)) if stamp else ""
        message = LOG_STAMP.sub("", line, count=1).strip() if stamp else line.strip()
        kind = kinds.setdefault(message, [0, when, when])
        kind[0] += 1
        kind[2] = when
    out = []
    for message, (count, first, last) in list(kinds.items())[:8]:
        times = f", {first} … {last}" if count > 1 and first else (f", {first}" if first else "")
        lines_word = "line" if count == 1 else "lines"
        out.append(f"{server.name} log ({count:,} {lines_word}{times}): {message[:400]}")
    if len(kinds) > 8:
        out.append(f"{server.name} log: ... {len(kinds) - 8} more kinds of lines")
    return out


# megaphone: "ts=2026-01-01T00:00:00.000Z ...";
# redis-server: "1234:M 29 Nov 2026 06:11:03.560 # ..."
LOG_STAMP = re.compile(r"^(?:ts=(\S+)|\d+:[A-Z] (\d+ \w+ \d+ [\d:.]+))\s*")


# --- the targets ----------------------------------------------------------------------------


def target_starters() -> dict[str, Starter]:
    """How each target is started (``profile.py`` starts them the same way)."""
    return {
        "megaphone": start_megaphone,
        "megaphone-redis": redis_starter(1),
        "megaphone-redis-2n": redis_starter(2),
        "megaphone-redis-w2": redis_starter(1, workers=2),
        "nchan": start_nchan,
        "nchan-redis": start_nchan_redis,
        "pushpin": start_pushpin,
    }
