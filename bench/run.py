"""Megaphone benchmark, with nchan (nginx, C) and pushpin (GRIP proxy) as baselines, in one command.

    python3 bench/run.py [--quick] [--duration 10]
        [--targets megaphone,megaphone-redis,megaphone-redis-2n,nchan,pushpin]
        [--workloads throughput,latency,idle,batch,create,scale,sweep,resume,churn,sse,websocket]
        [--repeat 3]
    python3 bench/run.py --workloads limits [--quick]     # bench/limits.py: issue #9's attacks

Targets: megaphone on its memory store; megaphone on the Redis store, one node
(``megaphone-redis``), two nodes on one Redis (``megaphone-redis-2n``: writes on node A, reads on
node B) and one node with ``workers = 2`` (``megaphone-redis-w2``: its two worker processes may run
on both CPUs, the load generator's too); nchan; pushpin with a minimal GRIP origin
(``bench/grip_origin.py``). For every target and workload (and every phase of the phased workloads)
fresh servers are started pinned to CPU 0 (``taskset``; the Redis targets' own redis-server and
pushpin's processes and origin too), the load generator (``bench/loadgen.py``) runs pinned to CPU
1, the servers are stopped by PID. The results are printed as a markdown table and written to
``bench/results/latest.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SERVER_CPU = 0
LOADGEN_CPU = 1
WANTED_NOFILE = 200_000
HARNESS_BOUND_PCT = 90.0  # load generator CPU share from which the harness is likely the limit
NOISY_PCT = 10.0  # CPU share of other processes from which a figure is likely disturbed
QUIET_PCT = 15.0  # background load under which the machine counts as quiet enough to start
QUIET_WAIT_TOTAL = 60.0  # seconds of such waiting allowed over a whole run
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
WORKLOADS = (
    "throughput",
    "latency",
    "idle",
    "batch",
    "create",
    "scale",
    "sweep",
    "resume",
    "churn",
    "sse",
    "websocket",
)
# the browser transports (issue #11): throughput and idle readers, as the NDJSON workloads
TRANSPORT_WORKLOADS = ("sse", "websocket")
# what each target can run (why not: bench/README.md); megaphone's targets run everything
CAN_RUN = {
    "nchan": ("throughput", "latency", "idle", "batch", "churn", "sse", "websocket"),
    "nchan-redis": ("throughput", "latency", "idle", "batch"),
    "pushpin": ("throughput", "latency", "idle", "batch"),
}
# what a target runs when --workloads is not given (a full pass stays ~10 min)
DEFAULT_WORKLOADS = {
    "megaphone-redis": ("throughput", "latency", "idle", "batch", "create", "scale", "sweep"),
    "megaphone-redis-2n": ("throughput", "latency", "idle", "batch", "create"),
    "megaphone-redis-w2": ("throughput", "latency", "idle", "batch", "create"),
    "nchan-redis": ("throughput", "latency", "idle", "batch"),
}
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


# --- workloads ------------------------------------------------------------------------------


@dataclass
class Plan:
    duration: float
    idle_sizes: tuple[int, ...]  # the idle workload's sizes (readers), one fresh server each
    redis_readers: int  # the largest idle size the Redis targets run
    create_duration: float
    phase_duration: float  # each resume phase, churn, each scale size
    nofile: int = WANTED_NOFILE  # the file descriptor limit the servers and load generator get
    workloads: tuple[str, ...] = WORKLOADS
    all_named: bool = False  # --workloads given: every target runs all of them it can
    pad_bytes: int = 160  # the body then weighs ~200 bytes
    latency_rate: float = 2_000.0  # latency: events/s over the 100 channels, paced
    batch_channels: int = 1_000
    batch_rounds: int = 5
    scale_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)  # channels in all; 100 are read
    redis_max_channels: int = 10_000  # the Redis targets' scale and sweep sizes stop here
    # sweep: (channels expiring in the window, channels in all)
    sweep_phases: tuple[tuple[int, int], ...] = (
        (0, 10_000),
        (1_000, 10_000),
        (0, 100_000),
        (1_000, 100_000),
        (10_000, 100_000),
    )
    sweep_interval_ms: int = 100
    sweep_window_s: float = 2.0
    resume_every_events: int = 1_000  # resume: a reader hangs up after this many events
    churn_channels: int = 1_000
    churn_rate: float = 5_000.0  # churn: events/s written over all channels
    churn_every_events: int = 5  # churn: hang up after 1..2n-1 events (mean n) ...
    churn_after_s: float = 1.0  # ... or after 0..2t seconds (mean t), whichever comes first
    hangup_linger_s: float = 0.01  # a hanging-up reader drops what arrives for this long
    transport_max_readers: int = 10_000  # sse, websocket: the idle sizes up to this many readers

    def runs(self, target: str) -> tuple[str, ...]:
        """The workloads ``target`` runs in this plan."""
        can = CAN_RUN.get(target, WORKLOADS)
        default = DEFAULT_WORKLOADS.get(target, can)
        return tuple(w for w in self.workloads if w in can and (self.all_named or w in default))

    def too_big(self, target: str, readers: int = 0, channels: int = 0) -> str | None:
        """Why a phase of that size is not run on ``target`` (None: it is)."""
        if readers and readers + 500 > self.nofile:
            return f"not run: needs ~{readers + 500:,} fds per side, RLIMIT_NOFILE {self.nofile:,}"
        if target in REDIS_BACKED and readers > self.redis_readers:
            return f"not run on Redis targets: --redis-readers {self.redis_readers:,}"
        if target in REDIS_BACKED and channels > self.redis_max_channels:
            return f"not run on Redis targets: more than {self.redis_max_channels:,} channels"
        return None

    def jobs(self, target: str) -> dict[str, dict[str, Any]]:
        """Every selected workload's load generator job; ``phases``: one fresh server each (a
        phase with ``skip`` is not run, the reason is shown instead)."""
        throughput = {
            "channels": 100,
            "writers": 32,
            "pad_bytes": self.pad_bytes,
            "warmup_s": 1.0,
            "duration_s": self.duration,
            "drain_s": 5.0,
        }
        paced = {  # churn: a fixed, moderate write rate over many channels
            "channels": self.churn_channels,
            "connect_concurrency": 256,
            "writers": 32,
            "write_rate": self.churn_rate,
            "pad_bytes": self.pad_bytes,
            "warmup_s": 1.0,
            "duration_s": self.phase_duration,
            "drain_s": 5.0,
        }

        def sized(job: dict[str, Any], readers: int = 0, channels: int = 0) -> dict[str, Any]:
            reason = self.too_big(target, readers, channels)
            return {**job, "skip": reason} if reason else job

        jobs: dict[str, dict[str, Any]] = {
            "throughput": throughput,
            "latency": {**throughput, "write_rate": self.latency_rate},
            "idle": {
                "phases": {
                    str(size): sized(
                        {
                            "readers": size,
                            "connect_concurrency": 256,
                            "settle_s": 1.0,
                            "writers": 64,
                            "pad_bytes": self.pad_bytes,
                            "fanout_timeout_s": 30.0,
                        },
                        readers=size,
                    )
                    for size in self.idle_sizes
                }
            },
            "batch": {
                "channels": self.batch_channels,
                "rounds": self.batch_rounds,
                "pad_bytes": self.pad_bytes,
                "timeout_s": 10.0,
            },
            "create": {
                "connections": 32,
                "warmup_s": 0.5,
                "duration_s": self.create_duration,
            },
            "scale": {
                "phases": {
                    str(size): sized(
                        {
                            **throughput,
                            "duration_s": self.phase_duration,
                            "idle_channels": size - throughput["channels"],
                        },
                        channels=size,
                    )
                    for size in self.scale_sizes
                }
            },
            "sweep": {
                "phases": {
                    f"{expiring}/{total}": sized(
                        {
                            "channels": total,
                            "expiring": expiring,
                            "ttl_s": self.sweep_ttl_s(target, total),
                            "sweep_interval_s": self.sweep_interval_ms / 1000,
                            "window_s": self.sweep_window_s,
                            "server_args": [
                                "--channel-ttl-millis",
                                str(round(1000 * self.sweep_ttl_s(target, total))),
                                "--sweep-interval-millis",
                                str(self.sweep_interval_ms),
                            ],
                        },
                        channels=total,
                    )
                    for expiring, total in self.sweep_phases
                }
            },
            "resume": {
                "phases": {
                    # the throughput workload, same client code as the next phase, no cursor
                    "plain": {**throughput, "duration_s": self.phase_duration, "cursor": "none"},
                    # every reader hangs up after every 1,000 events and resumes at once
                    "cursor": {
                        **throughput,
                        "duration_s": self.phase_duration,
                        "cursor": "mixed",  # even readers ?after=, odd ones Last-Event-ID
                        "reconnect_every_events": self.resume_every_events,
                        "hangup_linger_s": self.hangup_linger_s,
                    },
                    # the bookkeeping of the window itself: no window at all, no cursor
                    "nowindow": {
                        **throughput,
                        "duration_s": self.phase_duration,
                        "cursor": "none",
                        "server_args": ["--replay-window-size", "0"],
                    },
                }
            },
            "churn": {
                "phases": {
                    # the same writes and readers, nobody hangs up: the events' own cost
                    "steady": {**paced, "cursor": "none"},
                    "churn": {
                        **paced,
                        "cursor": "mixed",
                        "reconnect_every_events": self.churn_every_events,
                        "reconnect_jitter": True,
                        "reconnect_after_s": self.churn_after_s,
                        "hangup_linger_s": self.hangup_linger_s,
                    },
                }
            },
        }
        for transport in TRANSPORT_WORKLOADS:
            jobs[transport] = self.transport_job(target, transport, throughput, jobs["idle"])
        return {name: jobs[name] for name in self.runs(target)}

    def transport_sizes(self) -> tuple[int, ...]:
        return tuple(n for n in self.idle_sizes if n <= self.transport_max_readers)

    def transport_job(
        self,
        target: str,
        transport: str,
        throughput: dict[str, Any],
        idle: dict[str, Any],
    ) -> dict[str, Any]:
        """sse, websocket: the throughput workload and the idle sizes (up to
        ``transport_max_readers``) with every reader on that transport. megaphone keeps each read
        open as long as NDJSON's (``--poll-duration-millis 600000``, start_megaphone_node)."""
        extra: dict[str, Any] = {"transport": transport}
        if target.startswith("megaphone"):
            extra["server_args"] = [f"--{transport}-window-millis", "600000"]
        phases = {"throughput": {**throughput, **extra, "kind": "throughput"}}
        for size in self.transport_sizes():
            params = idle["phases"][str(size)]
            if not params.get("skip"):
                params = {**params, **extra, "kind": "idle"}
            phases[str(size)] = params
        return {"phases": phases}

    @staticmethod
    def sweep_ttl_s(target: str, total: int) -> float:
        """A TTL long enough to create every channel before the first ones expire (creating
        runs at ~25,000/s on the memory store, ~4,000/s on Redis)."""
        rate = 2_500 if target in REDIS_TARGETS else 20_000
        return 5.0 + total / rate


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


def run_loadgen(job: dict[str, Any]) -> dict[str, Any]:
    cmd = [*pinned(LOADGEN_CPU), sys.executable, str(BENCH / "loadgen.py"), json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if done.stderr.strip():
        result["loadgen_stderr"] = done.stderr[-2000:]
    return result


class QuietGate:
    """Before each workload, wait a little for other processes to leave the CPUs.

    At most ``per_workload`` seconds each time and ``total`` seconds over the whole run, so a
    machine that never calms down delays the run by a bounded amount.
    """

    def __init__(self, per_workload: float, total: float, retries: int = 0) -> None:
        self.per_workload = per_workload
        self.remaining = total
        self.retries = retries  # re-runs allowed for a workload disturbed by other processes

    def wait(self) -> float:
        """The background load (% of one core) seen last, after waiting."""
        busy = machine_busy_pct(0.5)
        budget = min(self.per_workload, self.remaining)
        if busy < QUIET_PCT or budget <= 0:
            return busy
        print(f"  machine busy ({busy:.0f}% of one core), waiting ...", file=sys.stderr)
        started = time.monotonic()
        while busy >= QUIET_PCT and time.monotonic() - started < budget:
            busy = machine_busy_pct(0.5)
        self.remaining -= time.monotonic() - started
        return busy


def run_target(
    target: str, start: Starter, plan: Plan, gate: QuietGate
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for workload, params in plan.jobs(target).items():
        if "phases" not in params:
            out[workload] = run_workload(target, start, workload, params, gate)
            continue
        phases = {
            phase: (
                {"skipped": phase_params["skip"]}
                if phase_params.get("skip")
                else run_workload(target, start, workload, phase_params, gate, phase)
            )
            for phase, phase_params in params["phases"].items()
        }
        ratios_of = PHASE_RATIOS.get(workload)
        ratios = ratios_of(phases) if ratios_of is not None else {}
        out[workload] = {"phases": phases, "ratios": ratios}
    return out


def run_workload(
    target: str,
    start: Starter,
    workload: str,
    params: dict[str, Any],
    gate: QuietGate,
    phase: str | None = None,
) -> dict[str, Any]:
    """One workload (or one phase of it) against a fresh server; with ``--retry-noisy N``, run
    again (up to N more times) while other processes took too much CPU, and keep the quietest."""
    name = f"{workload}/{phase}" if phase else workload
    attempts: list[dict[str, Any]] = []
    for attempt in range(gate.retries + 1):
        if attempt:
            print(
                f"  other processes took {noise(attempts[-1]):.0f}% of one core: again",
                file=sys.stderr,
            )
        attempts.append(run_once(target, start, workload, params, gate, name))
        if noise(attempts[-1]) < NOISY_PCT:
            break
    best = min(attempts, key=noise)
    if len(attempts) > 1:
        best["attempts_other_cpu_pct"] = [round(noise(a), 1) for a in attempts]
    return best


def noise(result: dict[str, Any]) -> float:
    """The CPU share other processes took during a result's measured window(s)."""
    if "error" in result:
        return float("inf")
    values = [dig("other_cpu_pct")(result), dig("fanout", "other_cpu_pct")(result)]
    return max((float(v) for v in values if isinstance(v, int | float)), default=0.0)


def run_once(
    target: str,
    start: Starter,
    workload: str,
    params: dict[str, Any],
    gate: QuietGate,
    name: str,
) -> dict[str, Any]:
    background = gate.wait()
    print(f"[{target}] {name} ...", file=sys.stderr, flush=True)
    params = dict(params)
    server_args: list[str] = params.pop("server_args", [])
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"bench-{target}-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        result: dict[str, Any] = {"error": "interrupted"}
        started: list[Server] = []
        deployment: Deployment | None = None
        try:
            deployment = start(workdir, server_args, started)
            job = {**params, "workload": workload, "host": "127.0.0.1", **deployment.job()}
            result = run_loadgen(job)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            problems: list[str] = []
            stop_s = 0.0
            for server in reversed(started):  # the nodes first, then their redis-server
                found, took = stop(server)
                problems += found
                stop_s += took
            result["server_problems"], result["server_stop_s"] = problems, stop_s
            if deployment is not None:
                result.update(deployment.describe())
            result["server_args"] = server_args
    result["background_cpu_pct_before"] = background
    result["took_s"] = round(time.monotonic() - began, 2)  # server start to stop, all included
    return result


def resume_ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """resume: the reconnecting phase (and the one without a window) over the plain one."""

    def ratio(phase: str, *keys: str) -> float | None:
        mine, base = dig(*keys)(phases.get(phase, {})), dig(*keys)(phases.get("plain", {}))
        if isinstance(mine, int | float) and isinstance(base, int | float) and base:
            return float(mine / base)
        return None

    return {
        "cursor_delivered": ratio("cursor", "delivered_per_s"),
        "cursor_cpu_per_1k": ratio("cursor", "server_cpu_ms_per_1k_events"),
        "cursor_p50": ratio("cursor", "latency", "p50_ms"),
        "cursor_p99": ratio("cursor", "latency", "p99_ms"),
        "nowindow_delivered": ratio("nowindow", "delivered_per_s"),
        "nowindow_cpu_per_1k": ratio("nowindow", "server_cpu_ms_per_1k_events"),
    }


def churn_ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """churn: server CPU per reconnect net of the events' own cost (the steady phase's)."""
    churn, steady = phases.get("churn", {}), phases.get("steady", {})
    rate = churn.get("reconnects_per_s")
    cpu, base = churn.get("server_cpu_pct"), steady.get("server_cpu_pct")
    if not rate or not isinstance(cpu, int | float) or not isinstance(base, int | float):
        return {"net_cpu_ms_per_1k_reconnects": None}
    # % of one core = 10 ms of CPU per second
    return {"net_cpu_ms_per_1k_reconnects": float(10 * (cpu - base) / rate * 1000)}


def scale_ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """scale: server CPU per event at each size over the smallest size's (flat = 1.00)."""
    sizes = sorted(phases, key=int)
    cpu = {size: dig("server_cpu_ms_per_1k_events")(phases[size]) for size in sizes}
    return {f"cpu_per_event_{size}": quotient(cpu[size], cpu[sizes[0]]) for size in sizes[1:]}


def sweep_ratios(phases: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """sweep: server CPU per 1,000 expired channels, net of the phase with as many channels and
    none expiring (its sweeps, scrapes and idle loop)."""
    out: dict[str, float | None] = {}
    for name, result in phases.items():
        expiring, total = name.split("/")
        base = phases.get(f"0/{total}", {})
        cpu, base_cpu = result.get("server_cpu_ms"), base.get("server_cpu_ms")
        if expiring == "0" or not isinstance(cpu, int | float):
            continue
        if isinstance(base_cpu, int | float):
            out[f"net_cpu_ms_per_1k_expired_{name}"] = 1000 * (cpu - base_cpu) / int(expiring)
    return out


PHASE_RATIOS: dict[str, Callable[[dict[str, dict[str, Any]]], dict[str, float | None]]] = {
    "resume": lambda phases: resume_ratios(phases),
    "churn": lambda phases: churn_ratios(phases),
    "scale": scale_ratios,
    "sweep": sweep_ratios,
}


# --- report ---------------------------------------------------------------------------------


Getter = Callable[[dict[str, Any]], Any]


def dig(*keys: str) -> Getter:
    def get(result: dict[str, Any]) -> Any:
        value: Any = result
        for key in keys:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    return get


def with_redis(server: Getter, redis: Getter) -> Getter:
    """All server-side CPU: the server's plus redis-server's (the server's alone without Redis)."""

    def get(result: dict[str, Any]) -> Any:
        mine, theirs = server(result), redis(result)
        if not isinstance(mine, int | float):
            return None
        return mine + (theirs if isinstance(theirs, int | float) else 0)

    return get


def by_node(*keys: str) -> Getter:
    """Each megaphone node's figure, "A 40 / B 30" (several nodes only)."""

    def get(result: dict[str, Any]) -> Any:
        nodes = dig(*keys)(result)
        if not isinstance(nodes, dict) or not nodes:
            return None
        return " / ".join(f"{name} {value:.0f}" for name, value in sorted(nodes.items()))

    return get


def fanout_per_1k(key: str) -> Getter:
    """Fan-out CPU (``fanout.<key>``, seconds) per 1,000 events received."""

    def get(result: dict[str, Any]) -> Any:
        cpu = dig("fanout", key)(result)
        received = result.get("fanout_received")
        if not isinstance(cpu, int | float) or not received:
            return None
        return float(1e6 * cpu / received)

    return get


def count_of(key: str) -> Getter:
    """The total of a ``{kind: count}`` figure (failed writes by status, refused reads ...)."""

    def get(result: dict[str, Any]) -> Any:
        counts = result.get(key)
        return sum(counts.values()) if isinstance(counts, dict) else None

    return get


RM = "Redis ÷ memory"
SR = "server + redis-server"
# (workload, label, getter, better: "up" | "down" | "" (no ratio), decimals)
Row = tuple[str, str, Getter, str, int]
ROWS: list[Row] = [
    ("throughput", "writes acknowledged /s", dig("acked_per_s"), "up", 0),
    ("throughput", "events delivered /s", dig("delivered_per_s"), "up", 0),
    (
        "throughput",
        f"{RM}: events delivered /s (issue #4: ≥ 0.50)",
        dig("vs_memory", "delivered_per_s"),
        "",
        2,
    ),
    ("throughput", "publish→deliver p50 (ms)", dig("latency", "p50_ms"), "down", 2),
    ("throughput", "publish→deliver p99 (ms)", dig("latency", "p99_ms"), "down", 2),
    ("throughput", "publish→deliver max (ms)", dig("latency", "max_ms"), "down", 2),
    ("throughput", "write ack round trip p50 (ms)", dig("ack_rtt", "p50_ms"), "down", 2),
    ("throughput", "events lost (acked, never delivered)", dig("lost"), "", 0),
    ("throughput", "write errors (non-2xx)", count_of("write_errors"), "", 0),
    ("throughput", "reads answered 5xx (opened again)", count_of("read_refused"), "", 0),
    ("throughput", "server CPU (% of one core)", dig("server_cpu_pct"), "", 0),
    ("throughput", "redis-server CPU (% of one core)", dig("redis_cpu_pct"), "", 0),
    ("throughput", "megaphone CPU by node (% of one core)", by_node("node_cpu_pct"), "", 0),
    ("throughput", "server CPU ms / 1,000 events", dig("server_cpu_ms_per_1k_events"), "down", 1),
    (
        "throughput",
        "redis-server CPU ms / 1,000 events",
        dig("redis_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "throughput",
        f"{SR} CPU ms / 1,000 events",
        with_redis(dig("server_cpu_ms_per_1k_events"), dig("redis_cpu_ms_per_1k_events")),
        "down",
        1,
    ),
    ("throughput", f"{RM}: {SR} CPU / event", dig("vs_memory", "cpu_per_event"), "", 2),
    ("throughput", "load generator CPU (% of one core)", dig("loadgen_cpu_pct"), "", 0),
    ("throughput", "other processes CPU (% of one core)", dig("other_cpu_pct"), "", 0),
    ("create", "channels created /s", dig("created_per_s"), "up", 0),
    ("create", f"{RM}: channels created /s", dig("vs_memory", "created_per_s"), "", 2),
    ("create", "create round trip p50 (ms)", dig("latency", "p50_ms"), "down", 2),
    ("create", "create round trip p99 (ms)", dig("latency", "p99_ms"), "down", 2),
    ("create", "server CPU (% of one core)", dig("server_cpu_pct"), "", 0),
    ("create", "redis-server CPU (% of one core)", dig("redis_cpu_pct"), "", 0),
    ("create", "server CPU ms / 1,000 creates", dig("server_cpu_ms_per_1k_creates"), "down", 1),
    (
        "create",
        "redis-server CPU ms / 1,000 creates",
        dig("redis_cpu_ms_per_1k_creates"),
        "down",
        1,
    ),
    (
        "create",
        f"{SR} CPU ms / 1,000 creates",
        with_redis(dig("server_cpu_ms_per_1k_creates"), dig("redis_cpu_ms_per_1k_creates")),
        "down",
        1,
    ),
    ("create", f"{RM}: {SR} CPU / create", dig("vs_memory", "cpu_per_create"), "", 2),
    ("create", "server RSS growth per channel (KiB)", dig("rss_per_channel_kib"), "down", 2),
    (
        "create",
        "redis-server RSS growth per channel (KiB)",
        dig("redis_rss_per_channel_kib"),
        "down",
        2,
    ),
    ("create", "load generator CPU (% of one core)", dig("loadgen_cpu_pct"), "", 0),
    ("create", "other processes CPU (% of one core)", dig("other_cpu_pct"), "", 0),
]


def in_phase(name: str, get: Getter) -> Getter:
    """A figure of one phase (None when the phase did not run)."""
    return lambda result: get(dig("phases", name)(result) or {})


def skipped_or(name: str, get: Getter) -> Getter:
    """A phase's figure, or why that phase was not run."""
    return lambda result: dig("phases", name, "skipped")(result) or in_phase(name, get)(result)


# the idle workload's rows, once per size: (label, getter, better, decimals)
IDLE_ROWS: list[tuple[str, Getter, str, int]] = [
    ("server RSS growth per reader (KiB)", dig("rss_per_reader_kib"), "down", 2),
    (
        "redis-server RSS growth per reader (KiB)",
        dig("redis_rss_per_reader_kib"),
        "down",
        2,
    ),
    ("time to open all readers (s)", dig("connect_s"), "down", 2),
    ("reads answered 5xx (opened again)", count_of("read_refused"), "", 0),
    ("server CPU while idle (% of one core)", dig("idle", "server_cpu_pct"), "", 1),
    (
        "redis-server CPU while idle (% of one core)",
        dig("idle", "redis_cpu_pct"),
        "",
        1,
    ),
    ("fan-out: every reader has its event (s)", dig("fanout_all_delivered_s"), "down", 3),
    ("fan-out writes answered non-2xx (written again)", count_of("write_errors"), "", 0),
    ("fan-out latency p50 (ms)", dig("fanout_latency", "p50_ms"), "down", 1),
    ("fan-out latency p99 (ms)", dig("fanout_latency", "p99_ms"), "down", 1),
    ("fan-out server CPU ms / 1,000 events", fanout_per_1k("server_cpu_s"), "down", 1),
    (
        "fan-out redis-server CPU ms / 1,000 events",
        fanout_per_1k("redis_cpu_s"),
        "down",
        1,
    ),
    (
        f"fan-out {SR} CPU ms / 1,000 events",
        with_redis(fanout_per_1k("server_cpu_s"), fanout_per_1k("redis_cpu_s")),
        "down",
        1,
    ),
    ("fan-out load generator CPU (% of one core)", dig("fanout", "loadgen_cpu_pct"), "", 0),
    ("fan-out other processes CPU (% of one core)", dig("fanout", "other_cpu_pct"), "", 0),
]


def idle_rows(sizes: Sequence[int]) -> list[Row]:
    rows: list[Row] = []
    for size in sizes:
        name = str(size)
        rows.append(
            (
                "idle",
                f"{size:,} readers: idle streaming readers",
                skipped_or(name, dig("readers")),
                "",
                0,
            )
        )
        rows += [
            ("idle", f"{size:,} readers: {label}", in_phase(name, get), better, decimals)
            for label, get, better, decimals in IDLE_ROWS
        ]
    return rows


def phase(name: str, *keys: str) -> Getter:
    return dig("phases", name, *keys)


def total(*getters: Getter) -> Getter:
    """The sum of several figures (None when none is there)."""

    def get(result: dict[str, Any]) -> Any:
        values = [g(result) for g in getters]
        numbers = [v for v in values if isinstance(v, int | float)]
        return sum(numbers) if numbers else None

    return get


def rss_growth_mib(result: dict[str, Any]) -> float | None:
    start, end = result.get("rss_start_kib"), result.get("rss_end_kib")
    if not isinstance(start, int | float) or not isinstance(end, int | float):
        return None
    return (end - start) / 1024


def max_other(result: dict[str, Any]) -> Any:
    """The noisiest phase's "other processes" CPU."""
    values = [p.get("other_cpu_pct") for p in result.get("phases", {}).values()]
    numbers = [v for v in values if isinstance(v, int | float)]
    return max(numbers) if numbers else None


def unknown_cursors(result: dict[str, Any]) -> Any:
    """Reads answered ``megaphone-resume: unknown-cursor`` (None: the header never came)."""
    headers = result.get("resume_headers")
    if not isinstance(headers, dict) or not set(headers) - {"(none)"}:
        return None
    return headers.get("unknown-cursor", 0)


P, C, W = "no cursor", "cursor", "window 0"
ROWS += [
    ("resume", f"{P}: events delivered /s", phase("plain", "delivered_per_s"), "up", 0),
    ("resume", f"{C}: events delivered /s", phase("cursor", "delivered_per_s"), "up", 0),
    ("resume", f"{C} ÷ {P}: events delivered /s", dig("ratios", "cursor_delivered"), "", 2),
    (
        "resume",
        f"{P}: server CPU ms / 1,000 events",
        phase("plain", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "resume",
        f"{C}: server CPU ms / 1,000 events",
        phase("cursor", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    ("resume", f"{C} ÷ {P}: server CPU / event", dig("ratios", "cursor_cpu_per_1k"), "", 2),
    (
        "resume",
        f"{P}: redis-server CPU ms / 1,000 events",
        phase("plain", "redis_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "resume",
        f"{C}: redis-server CPU ms / 1,000 events",
        phase("cursor", "redis_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    ("resume", f"{P}: publish→deliver p50 (ms)", phase("plain", "latency", "p50_ms"), "down", 2),
    ("resume", f"{C}: publish→deliver p50 (ms)", phase("cursor", "latency", "p50_ms"), "down", 2),
    ("resume", f"{P}: publish→deliver p99 (ms)", phase("plain", "latency", "p99_ms"), "down", 2),
    ("resume", f"{C}: publish→deliver p99 (ms)", phase("cursor", "latency", "p99_ms"), "down", 2),
    ("resume", f"{C}: reconnects /s", phase("cursor", "reconnects_per_s"), "", 0),
    (
        "resume",
        f"{C}: read-open p50 (ms)",
        phase("cursor", "open_latency", "p50_ms"),
        "down",
        2,
    ),
    (
        "resume",
        f"{C}: read-open p99 (ms)",
        phase("cursor", "open_latency", "p99_ms"),
        "down",
        2,
    ),
    ("resume", f"{C}: events replayed (server count)", phase("cursor", "server_replayed"), "", 0),
    (
        "resume",
        f"{C}: replays of events dropped at hang-up (client)",
        phase("cursor", "replays_seen"),
        "",
        0,
    ),
    (
        "resume",
        "duplicates (events received again after being taken)",
        total(phase("plain", "duplicates"), phase("cursor", "duplicates")),
        "",
        0,
    ),
    (
        "resume",
        "events lost (acked, never delivered)",
        total(phase("plain", "lost"), phase("cursor", "lost")),
        "",
        0,
    ),
    (
        "resume",
        f"{C}: unknown-cursor answers",
        lambda r: (
            unknown_cursors(r["phases"]["cursor"]) if "cursor" in r.get("phases", {}) else None
        ),
        "",
        0,
    ),
    (
        "resume",
        f"{C}: 409 busy answers to a reconnect (phase)",
        phase("cursor", "total_busy"),
        "",
        0,
    ),
    ("resume", f"{P}: server CPU (% of one core)", phase("plain", "server_cpu_pct"), "", 0),
    ("resume", f"{C}: server CPU (% of one core)", phase("cursor", "server_cpu_pct"), "", 0),
    (
        "resume",
        f"{P}: load generator CPU (% of one core)",
        phase("plain", "loadgen_cpu_pct"),
        "",
        0,
    ),
    (
        "resume",
        f"{C}: load generator CPU (% of one core)",
        phase("cursor", "loadgen_cpu_pct"),
        "",
        0,
    ),
    ("resume", "other processes CPU, max of phases (% of one core)", max_other, "", 0),
    (
        "resume",
        f"{P}: server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("plain")(r) or {}),
        "",
        1,
    ),
    (
        "resume",
        f"{C}: server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("cursor")(r) or {}),
        "",
        1,
    ),
    ("resume", f"{W}: events delivered /s", phase("nowindow", "delivered_per_s"), "up", 0),
    (
        "resume",
        f"{W}: server CPU ms / 1,000 events",
        phase("nowindow", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    ("resume", f"{W} ÷ {P}: server CPU / event", dig("ratios", "nowindow_cpu_per_1k"), "", 2),
    (
        "resume",
        f"{W}: server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("nowindow")(r) or {}),
        "",
        1,
    ),
    ("churn", "readers (channels)", phase("churn", "channels"), "", 0),
    ("churn", "write rate asked (events/s)", phase("churn", "write_rate"), "", 0),
    ("churn", "writes acknowledged /s", phase("churn", "acked_per_s"), "up", 0),
    ("churn", "events delivered /s", phase("churn", "delivered_per_s"), "up", 0),
    ("churn", "reconnects /s", phase("churn", "reconnects_per_s"), "up", 0),
    ("churn", "read-open p50 (ms)", phase("churn", "open_latency", "p50_ms"), "down", 2),
    ("churn", "read-open p99 (ms)", phase("churn", "open_latency", "p99_ms"), "down", 2),
    ("churn", "409 busy answers to a reconnect /s", phase("churn", "busy_per_s"), "", 1),
    ("churn", "publish→deliver p50 (ms)", phase("churn", "latency", "p50_ms"), "down", 2),
    ("churn", "publish→deliver p99 (ms)", phase("churn", "latency", "p99_ms"), "down", 2),
    ("churn", "events replayed (server count)", phase("churn", "server_replayed"), "", 0),
    (
        "churn",
        "replays of events dropped at hang-up (client)",
        phase("churn", "replays_seen"),
        "",
        0,
    ),
    (
        "churn",
        "duplicates (received again after being taken)",
        total(phase("steady", "duplicates"), phase("churn", "duplicates")),
        "",
        0,
    ),
    (
        "churn",
        "events lost (acked, never delivered)",
        total(phase("steady", "lost"), phase("churn", "lost")),
        "",
        0,
    ),
    ("churn", "unknown-cursor answers", lambda r: unknown_cursors(phase("churn")(r) or {}), "", 0),
    ("churn", "server CPU (% of one core)", phase("churn", "server_cpu_pct"), "", 0),
    (
        "churn",
        "server CPU ms / 1,000 events",
        phase("churn", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    ("churn", "redis-server CPU (% of one core)", phase("churn", "redis_cpu_pct"), "", 0),
    (
        "churn",
        "redis-server CPU ms / 1,000 events",
        phase("churn", "redis_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "churn",
        f"{SR} CPU ms / 1,000 events",
        with_redis(
            phase("churn", "server_cpu_ms_per_1k_events"),
            phase("churn", "redis_cpu_ms_per_1k_events"),
        ),
        "down",
        1,
    ),
    (
        "churn",
        "server CPU ms / 1,000 reconnects (all CPU)",
        phase("churn", "server_cpu_ms_per_1k_reconnects"),
        "down",
        1,
    ),
    ("churn", "no hang-ups: server CPU (% of one core)", phase("steady", "server_cpu_pct"), "", 0),
    (
        "churn",
        "no hang-ups: server CPU ms / 1,000 events",
        phase("steady", "server_cpu_ms_per_1k_events"),
        "down",
        1,
    ),
    (
        "churn",
        "server CPU ms / 1,000 reconnects, net of the events",
        dig("ratios", "net_cpu_ms_per_1k_reconnects"),
        "down",
        1,
    ),
    (
        "churn",
        "server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("churn")(r) or {}),
        "",
        1,
    ),
    (
        "churn",
        "no hang-ups: server RSS growth over the phase (MiB)",
        lambda r: rss_growth_mib(phase("steady")(r) or {}),
        "",
        1,
    ),
    ("churn", "load generator CPU (% of one core)", phase("churn", "loadgen_cpu_pct"), "", 0),
    (
        "churn",
        "other processes CPU, max of phases (% of one core)",
        max_other,
        "",
        0,
    ),
]

# latency: the throughput rows, after the rate asked and how well the writers kept to it; the
# CPU per event at that rate says so in its label (issue #14: the figure real deployments see,
# quoted beside the saturated one)
PACED_LABELS = {
    "server CPU ms / 1,000 events": "server CPU ms / 1,000 events, paced (the rate asked above)",
}
LATENCY_ROWS: list[Row] = [
    ("latency", "write rate asked (events/s, paced, 100 channels)", dig("write_rate"), "", 0),
    ("latency", "writes sent > 1 ms behind schedule", dig("writes_late"), "", 0),
    *(
        ("latency", PACED_LABELS.get(row[1], row[1]), *row[2:])
        for row in ROWS
        if row[0] == "throughput"
    ),
]


def batch_rows() -> list[Row]:
    rows: list[Row] = [("batch", "channels, one streaming reader each", dig("channels"), "", 0)]
    for mode, what in (("batch", "one write to all"), ("single", "1,000 single writes")):
        rows += [
            ("batch", f"{what}: requests per round", dig(mode, "requests_per_round"), "", 0),
            (
                "batch",
                f"{what}: every reader has the event (s, median of rounds)",
                dig(mode, "all_delivered_s"),
                "down",
                3,
            ),
            ("batch", f"{what}: slowest round (s)", dig(mode, "all_delivered_max_s"), "down", 3),
            ("batch", f"{what}: latency p50 (ms)", dig(mode, "latency", "p50_ms"), "down", 1),
            ("batch", f"{what}: latency p99 (ms)", dig(mode, "latency", "p99_ms"), "down", 1),
            (
                "batch",
                f"{what}: server CPU ms / 1,000 events",
                dig(mode, "server_cpu_ms_per_1k_events"),
                "down",
                1,
            ),
            (
                "batch",
                f"{what}: redis-server CPU ms / 1,000 events",
                dig(mode, "redis_cpu_ms_per_1k_events"),
                "down",
                1,
            ),
        ]
    return [
        *rows,
        (
            "batch",
            "one write ÷ single writes: server CPU / event",
            dig("batch_vs_single_cpu"),
            "",
            2,
        ),
        (
            "batch",
            "writes answered non-2xx or with failures",
            count_of("write_error_bodies"),
            "",
            0,
        ),
        ("batch", "rounds not delivered to every reader in 10 s", dig("rounds_timed_out"), "", 0),
        ("batch", LOADGEN_ROW, dig("loadgen_cpu_pct"), "", 0),
        ("batch", "other processes CPU (% of one core)", dig("other_cpu_pct"), "", 0),
    ]


def scale_rows(sizes: Sequence[int]) -> list[Row]:
    rows: list[Row] = []
    for size in sizes:
        name, what = str(size), f"{size:,} channels"
        rows += [
            (
                "scale",
                f"{what}: events delivered /s",
                skipped_or(name, dig("delivered_per_s")),
                "up",
                0,
            ),
            (
                "scale",
                f"{what}: server CPU ms / 1,000 events",
                in_phase(name, dig("server_cpu_ms_per_1k_events")),
                "down",
                1,
            ),
            (
                "scale",
                f"{what}: {SR} CPU ms / 1,000 events",
                in_phase(
                    name,
                    with_redis(
                        dig("server_cpu_ms_per_1k_events"), dig("redis_cpu_ms_per_1k_events")
                    ),
                ),
                "down",
                1,
            ),
            (
                "scale",
                f"{what}: publish→deliver p99 (ms)",
                in_phase(name, dig("latency", "p99_ms")),
                "down",
                2,
            ),
            (
                "scale",
                f"{what}: server RSS (MiB)",
                in_phase(name, lambda r: (r.get("server_rss_kib") or 0) / 1024 or None),
                "down",
                0,
            ),
        ]
    rows += [
        (
            "scale",
            f"{size:,} ÷ {sizes[0]:,} channels: server CPU / event (flat = 1.00)",
            dig("ratios", f"cpu_per_event_{size}"),
            "",
            2,
        )
        for size in sizes[1:]
    ]
    rows += [
        (
            "scale",
            "events lost (acked, never delivered), all sizes",
            total(*(in_phase(str(n), dig("lost")) for n in sizes)),
            "",
            0,
        ),
        ("scale", "other processes CPU, max of sizes (% of one core)", max_other, "", 0),
    ]
    return rows


def sweep_rows(phases: Sequence[tuple[int, int]]) -> list[Row]:
    rows: list[Row] = []
    for expiring, count in phases:
        name, what = f"{expiring}/{count}", f"{expiring:,} of {count:,} expire"
        rows += [
            ("sweep", f"{what}: channel TTL (s)", skipped_or(name, dig("ttl_s")), "", 1),
            (
                "sweep",
                f"{what}: disposed in the window (server count)",
                in_phase(name, dig("disposed_in_window")),
                "",
                0,
            ),
            (
                "sweep",
                f"{what}: server CPU in the window (ms)",
                in_phase(name, dig("server_cpu_ms")),
                "down",
                0,
            ),
            (
                "sweep",
                f"{what}: redis-server CPU in the window (ms)",
                in_phase(name, dig("redis_cpu_ms")),
                "down",
                0,
            ),
        ]
        if expiring:
            rows.append(
                (
                    "sweep",
                    f"{what}: server CPU ms / 1,000 expired, net of 0 of {count:,}",
                    dig("ratios", f"net_cpu_ms_per_1k_expired_{name}"),
                    "down",
                    1,
                )
            )
    rows.append(("sweep", "other processes CPU, max of phases (% of one core)", max_other, "", 0))
    return rows


# the sse and websocket workloads' rows from their throughput phase: (label, getter, better,
# decimals); their idle sizes get IDLE_ROWS
TRANSPORT_THROUGHPUT_ROWS: list[tuple[str, Getter, str, int]] = [
    ("events delivered /s", dig("delivered_per_s"), "up", 0),
    ("publish→deliver p50 (ms)", dig("latency", "p50_ms"), "down", 2),
    ("publish→deliver p99 (ms)", dig("latency", "p99_ms"), "down", 2),
    ("events lost (acked, never delivered)", dig("lost"), "", 0),
    ("write errors (non-2xx)", count_of("write_errors"), "", 0),
    ("server CPU (% of one core)", dig("server_cpu_pct"), "", 0),
    ("server CPU ms / 1,000 events", dig("server_cpu_ms_per_1k_events"), "down", 1),
    ("load generator CPU (% of one core)", dig("loadgen_cpu_pct"), "", 0),
    ("other processes CPU (% of one core)", dig("other_cpu_pct"), "", 0),
]


def transport_rows(sizes: Sequence[int]) -> list[Row]:
    rows: list[Row] = []
    for workload in TRANSPORT_WORKLOADS:
        rows += [
            (workload, f"throughput: {label}", in_phase("throughput", get), better, decimals)
            for label, get, better, decimals in TRANSPORT_THROUGHPUT_ROWS
        ]
        rows += [(workload, *row[1:]) for row in idle_rows(sizes)]
    return rows


def transport_summary(results: dict[str, dict[str, dict[str, Any]]], plan: Plan) -> str | None:
    """Issue #11's target, one line per figure: megaphone ÷ nchan on each transport beside the
    NDJSON ratio (workloads throughput and idle), and whether each is within it (None: megaphone
    and nchan did not both run a browser transport)."""
    mine, base = results.get("megaphone", {}), results.get("nchan", {})
    ran = [t for t in TRANSPORT_WORKLOADS if t in mine and t in base]
    if not ran or not plan.transport_sizes():
        return None
    size = str(max(plan.transport_sizes()))
    figures: list[tuple[str, str, Getter, str, str]] = [  # label, phase, getter, better, format
        ("events delivered /s", "throughput", dig("delivered_per_s"), "up", ",.0f"),
        (
            "server CPU ms / 1,000 events",
            "throughput",
            dig("server_cpu_ms_per_1k_events"),
            "down",
            ".1f",
        ),
        (
            f"server RSS per idle reader, {int(size):,} readers (KiB)",
            size,
            dig("rss_per_reader_kib"),
            "down",
            ".2f",
        ),
        (
            f"fan-out to {int(size):,} idle readers (s)",
            size,
            dig("fanout_all_delivered_s"),
            "down",
            ".3f",
        ),
    ]

    def get(result: dict[str, Any] | None, workload: str, name: str, getter: Getter) -> Any:
        if not result or "error" in result:
            return None
        if workload in TRANSPORT_WORKLOADS:
            return in_phase(name, getter)(result)
        return getter(result) if name == "throughput" else in_phase(name, getter)(result)

    header = ["figure", "NDJSON ÷ nchan"]
    for t in ran:
        header += [f"{t}: megaphone", f"{t}: nchan", f"{t} ÷ nchan", "within?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, name, getter, better, spec in figures:
        nd_workload = "throughput" if name == "throughput" else "idle"
        nd = quotient(
            get(mine.get(nd_workload), nd_workload, name, getter),
            get(base.get(nd_workload), nd_workload, name, getter),
        )
        cells = [label, f"{nd:.2f}x" if nd is not None else "—"]
        for t in ran:
            a, b = get(mine.get(t), t, name, getter), get(base.get(t), t, name, getter)
            ratio = quotient(a, b)
            within = "—"
            if ratio is not None and nd is not None:
                within = "yes" if (ratio >= nd if better == "up" else ratio <= nd) else "no"
            cells += [
                format(a, spec) if isinstance(a, int | float) else "—",
                format(b, spec) if isinstance(b, int | float) else "—",
                f"{ratio:.2f}x" if ratio is not None else "—",
                within,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_rows(plan: Plan) -> list[Row]:
    """Every row of the table, in the order of WORKLOADS."""
    rows = [
        *ROWS,
        *LATENCY_ROWS,
        *idle_rows(plan.idle_sizes),
        *batch_rows(),
        *scale_rows(plan.scale_sizes),
        *sweep_rows(plan.sweep_phases),
        *transport_rows(plan.transport_sizes()),
    ]
    return sorted(rows, key=lambda row: WORKLOADS.index(row[0]))


LOADGEN_ROW = "load generator CPU (% of one core)"  # rows ending so get the harness-bound flag
NOISE_ROW = "(% of one core)"  # rows with "other processes CPU" and ending so get the noisy flag


def fmt(value: Any, decimals: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float | int):
        return f"{value:,.{decimals}f}"
    return str(value)


# (column title, target, the target it is divided by)
RATIO_COLUMNS = (
    ("megaphone ÷ nchan", "megaphone", "nchan"),
    ("megaphone ÷ pushpin", "megaphone", "pushpin"),
    ("redis ÷ memory", "megaphone-redis", "megaphone"),
    ("redis-2n ÷ memory", "megaphone-redis-2n", "megaphone"),
    ("megaphone-redis ÷ nchan-redis", "megaphone-redis", "nchan-redis"),
)


def table(
    results: dict[str, dict[str, dict[str, Any]]], targets: list[str], rows: list[Row]
) -> str:
    ratios = [(title, a, b) for title, a, b in RATIO_COLUMNS if a in targets and b in targets]
    header = ["workload", "metric", *targets, *(title for title, _, _ in ratios)]
    if ratios:
        header.append("better")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for workload, label, get, better, decimals in rows:
        values: dict[str, Any] = {}
        for target in targets:
            result = results.get(target, {}).get(workload)
            values[target] = None if result is None or "error" in result else get(result)
        if all(v is None for v in values.values()):
            continue
        cells = [workload, label]
        for target in targets:
            cell = fmt(values[target], decimals)
            if label.endswith(LOADGEN_ROW) and (values[target] or 0) >= HARNESS_BOUND_PCT:
                cell += " ⚠ harness-bound"
            noise = "other processes CPU" in label and label.endswith(NOISE_ROW)
            if noise and (values[target] or 0) >= NOISY_PCT:
                cell += " ⚠ noisy"
            cells.append(cell)
        for _, mine_target, base_target in ratios:
            mine, base = values.get(mine_target), values.get(base_target)
            ratio = "—"
            if better and isinstance(mine, int | float) and isinstance(base, int | float) and base:
                ratio = f"{mine / base:.2f}x"
            cells.append(ratio)
        if ratios:
            cells.append({"up": "higher", "down": "lower"}.get(better, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_vs_memory(passes: dict[str, list[dict[str, dict[str, Any]]]]) -> None:
    """Each Redis target's pass against the memory store's pass of the same number: events
    delivered /s and all server-side CPU per event (megaphone + redis-server), creations alike.
    Stored as ``vs_memory`` in the Redis target's workload result (the table shows the median)."""
    memory = passes.get("megaphone") or []
    for target in REDIS_TARGETS:
        for number, workloads in enumerate(passes.get(target) or []):
            if number >= len(memory):
                break
            base = memory[number]
            for workload, rate, cpu, redis_cpu, out_rate, out_cpu in (
                (
                    "throughput",
                    "delivered_per_s",
                    "server_cpu_ms_per_1k_events",
                    "redis_cpu_ms_per_1k_events",
                    "delivered_per_s",
                    "cpu_per_event",
                ),
                (
                    "create",
                    "created_per_s",
                    "server_cpu_ms_per_1k_creates",
                    "redis_cpu_ms_per_1k_creates",
                    "created_per_s",
                    "cpu_per_create",
                ),
            ):
                mine, theirs = workloads.get(workload), base.get(workload)
                if not mine or not theirs or "error" in mine or "error" in theirs:
                    continue
                all_cpu = with_redis(dig(cpu), dig(redis_cpu))
                mine["vs_memory"] = {
                    out_rate: quotient(mine.get(rate), theirs.get(rate)),
                    out_cpu: quotient(all_cpu(mine), all_cpu(theirs)),
                }


def quotient(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return float(a / b)
    return None


def median_merge(values: list[Any]) -> Any:
    """Merge the passes of one workload: the median of every number, recursively."""
    ok = [v for v in values if not (isinstance(v, dict) and "error" in v)] or values
    if all(isinstance(v, dict) for v in ok):
        keys = dict.fromkeys(k for v in ok for k in v)
        return {k: median_merge([v[k] for v in ok if k in v]) for k in keys}
    numbers = [v for v in ok if isinstance(v, int | float) and not isinstance(v, bool)]
    if numbers and len(numbers) == len(ok):
        return statistics.median(numbers)
    if all(isinstance(v, list) for v in ok):
        return [item for v in ok for item in v]
    return next((v for v in ok if v is not None), None)


def anomalies(passes: dict[str, list[dict[str, dict[str, Any]]]]) -> Iterator[str]:
    for target, runs in passes.items():
        for number, workloads in enumerate(runs, 1):
            yield from pass_anomalies(
                target, workloads, f" (pass {number})" if len(runs) > 1 else ""
            )


def pass_anomalies(target: str, workloads: dict[str, dict[str, Any]], tag: str) -> Iterator[str]:
    for workload, result in workloads.items():
        phases = result.get("phases")
        if isinstance(phases, dict):
            for name, r in phases.items():
                yield from result_anomalies(f"{target}/{workload}/{name}{tag}", workload, r)
        else:
            yield from result_anomalies(f"{target}/{workload}{tag}", workload, result)


def result_anomalies(where: str, workload: str, r: dict[str, Any]) -> Iterator[str]:
    if "error" in r:
        yield f"{where}: workload failed: {r['error']}"
    for problem in r.get("server_problems", []):
        yield f"{where}: {problem}"
    for key in (
        "lost",
        "duplicates",
        "misrouted",
        "unparseable",
        "delivered_but_not_acked",
    ):
        if r.get(key):
            yield f"{where}: {key} = {r[key]}"
    for key in ("write_errors", "failures", "open_failures", "ws_closes"):
        if r.get(key):
            yield f"{where}: {key} = {r[key]}"
    for key, what in (
        ("write_error_bodies", "writes answered"),
        ("failure_bodies", "creates answered"),
        ("read_refused", "reads answered (opened again)"),
    ):
        for answer, count in (r.get(key) or {}).items():
            yield f"{where}: {count:.0f} {what} {answer}"
    for key in ("readers_ended_or_lost", "early_lines", "extra_lines", "readers_reopened_at_end"):
        if r.get(key):
            yield f"{where}: {key} = {r[key]}"
    if r.get("fanout_timed_out"):
        yield (
            f"{where}: fan-out timed out, {r.get('fanout_received')} of "
            f"{r.get('readers')} readers got their event"
        )
    headers = r.get("resume_headers") or {}
    if headers.get("unknown-cursor"):
        yield f"{where}: {headers['unknown-cursor']} reads answered unknown-cursor"
    if r.get("cursors_sent") and not headers.get("resumed") and where.startswith("megaphone"):
        yield f"{where}: {r['cursors_sent']} cursors sent, no read answered resumed ({headers})"
    if r.get("dropped_never_replayed"):
        yield (
            f"{where}: {r['dropped_never_replayed']} events dropped at a hang-up were never "
            "received again"
        )
    metrics = r.get("server_metrics") or {}
    if r.get("rounds_timed_out"):
        yield f"{where}: {r['rounds_timed_out']} rounds not delivered to every reader in 10 s"
    if r.get("setup_late"):
        yield (
            f"{where}: creating the channels took too long for the TTL (expiring ones "
            f"{r.get('create_expiring_s', 0):.2f} s, all {r.get('create_all_s', 0):.2f} s of "
            f"{r.get('ttl_s')} s): the window may miss expiries or include creations"
        )
    disposed = r.get("disposed_in_window")
    if workload == "sweep" and disposed is not None and disposed != r.get("expiring"):
        yield f"{where}: {disposed:.0f} channels disposed in the window, not {r.get('expiring')}"
    # scale: the server also counted the idle channels' writes
    throughput_like = workload in ("throughput", "latency", "resume", "churn")
    if (throughput_like or r.get("kind") == "throughput") and metrics:
        received = metrics.get("megaphone_messages_received")
        read = metrics.get("megaphone_messages_read")
        acked, delivered = r.get("total_acked"), r.get("total_delivered")
        if received is not None and received != acked:
            yield f"{where}: server counted {received:.0f} received, client {acked} acked"
        # messages_read counts first sends only (replays are messages_replayed)
        if read is not None and read != delivered:
            yield f"{where}: server counted {read:.0f} read, client {delivered} delivered"
    if r.get("loadgen_stderr"):
        yield f"{where}: load generator stderr: {r['loadgen_stderr'][:300]}"


# --- main -----------------------------------------------------------------------------------


def sizes_arg(text: str) -> tuple[int, ...]:
    sizes = tuple(sorted({int(x.replace("_", "")) for x in text.split(",") if x.strip()}))
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("comma-separated positive numbers")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run: 3 s, 2 s phases, 1,000 idle readers, scale/sweep to 10,000 channels",
    )
    parser.add_argument("--duration", type=float, default=None, help="throughput seconds (10)")
    parser.add_argument(
        "--readers",
        type=sizes_arg,
        default=None,
        help="idle workload sizes, comma-separated (1000,10000,50000; quick: 1000)",
    )
    parser.add_argument(
        "--redis-readers",
        type=int,
        default=1_000,
        help="largest idle size on the Redis targets (1,000: each idle reader polls Redis)",
    )
    parser.add_argument(
        "--channels",
        type=sizes_arg,
        default=None,
        help="scale workload sizes, channels in all (1000,10000,100000; quick: 1000,10000)",
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated, from {','.join(TARGETS)}"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install nginx/nchan or redis-server if missing",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="passes over every target and workload; the table shows the median (1)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="before each workload wait up to this many seconds (60 s per run in all) for other "
        "load to stop (15)",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        default=0,
        help=f"run a workload again, up to N more times, while other processes took "
        f"{NOISY_PCT:.0f}%% of a core or more during it; the quietest attempt counts (0)",
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help=f"comma-separated, from {','.join(WORKLOADS)} (all that each target can run; "
        "megaphone-redis-2n: not scale, sweep, resume, churn, megaphone-redis: not resume, "
        "churn, unless named here); or `limits` alone: bench/limits.py (issue #9's attacks)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    args.workloads_named = args.workloads is not None
    if args.workloads is None:
        args.workloads = ",".join(WORKLOADS)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown_workloads = set(args.workloads) - set(WORKLOADS)
    if unknown_workloads or not args.workloads:
        parser.error(
            f"unknown workloads {sorted(unknown_workloads)}; choose from {', '.join(WORKLOADS)}"
        )
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.retry_noisy < 0:
        parser.error("--retry-noisy must be 0 or more")
    return args


def limits_only(argv: list[str] | None) -> list[str] | None:
    """``--workloads limits`` (alone): issue #9's attacks, run by ``bench/limits.py`` with its
    own servers and table; the arguments to pass it, else None."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--workloads")
    early.add_argument("--quick", action="store_true")
    early.add_argument("--output")
    known, _ = early.parse_known_args(argv)
    if known.workloads != "limits":
        return None
    return ["--quick"] * known.quick + (["--output", known.output] if known.output else [])


def main(argv: list[str] | None = None) -> int:
    limits_args = limits_only(argv)
    if limits_args is not None:
        import limits  # beside this file

        return limits.main(limits_args)
    args = parse_args(argv)
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    nofile = raise_nofile()
    quick = args.quick
    plan = Plan(
        duration=duration,
        idle_sizes=args.readers or ((1_000,) if quick else (1_000, 10_000, 50_000)),
        redis_readers=args.redis_readers,
        create_duration=min(duration, 2.0 if quick else 5.0),
        phase_duration=min(duration, 2.0 if quick else 5.0),
        nofile=nofile[0],
        workloads=tuple(w for w in WORKLOADS if w in args.workloads),
        all_named=args.workloads_named,
        batch_rounds=3 if quick else 5,
        scale_sizes=args.channels or ((1_000, 10_000) if quick else (1_000, 10_000, 100_000)),
    )
    if quick:
        plan.sweep_phases = tuple(p for p in plan.sweep_phases if p[1] <= 10_000)
    if not pinned(0):
        print("warning: no CPU pinning (needs taskset and 2+ CPUs)", file=sys.stderr)
    for size in plan.idle_sizes:
        reason = plan.too_big("megaphone", readers=size)
        if reason:
            print(f"warning: idle workload, {size:,} readers {reason}", file=sys.stderr)

    background = machine_busy_pct()
    if background > 10:
        print(
            f"warning: the machine is already {background:.0f}% busy (of one core) before the "
            "run; other processes will disturb the figures",
            file=sys.stderr,
        )
    started = dt.datetime.now(dt.UTC)
    source_at_start = git_state()
    skipped: dict[str, str] = {}
    for target in args.targets:
        if not plan.jobs(target):
            skipped[target] = f"none of the workloads {', '.join(plan.workloads)} applies to it"
    for nchan_target in NCHAN_TARGETS:
        if nchan_target in args.targets and nchan_target not in skipped:
            reason = ensure_nchan(install=not args.no_install)
            if reason:
                skipped[nchan_target] = reason
                print(f"skipping {nchan_target}: {reason}", file=sys.stderr)
    wants_redis = [t for t in args.targets if t in REDIS_BACKED and t not in skipped]
    if wants_redis:
        reason = ensure_redis(install=not args.no_install)
        if reason:
            for target in wants_redis:
                skipped[target] = reason
            print(f"skipping {', '.join(wants_redis)}: {reason}", file=sys.stderr)
    if "pushpin" in args.targets and "pushpin" not in skipped:
        reason = ensure_pushpin(install=not args.no_install)
        if reason:
            skipped["pushpin"] = reason
            print(f"skipping pushpin: {reason}", file=sys.stderr)
    ran = [t for t in TARGETS if t in args.targets and t not in skipped]
    starters = target_starters()
    passes: dict[str, list[dict[str, dict[str, Any]]]] = {t: [] for t in ran}
    gate = QuietGate(args.quiet_wait, total=QUIET_WAIT_TOTAL, retries=args.retry_noisy)
    for number in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"pass {number}/{args.repeat}", file=sys.stderr)
        for target in ran:  # passes interleave targets, so slow drifts hit both alike
            passes[target].append(run_target(target, starters[target], plan, gate))
    add_vs_memory(passes)
    results = {
        target: {workload: median_merge([run[workload] for run in runs]) for workload in runs[0]}
        for target, runs in passes.items()
    }
    elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()

    env: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "megaphone_source": git_state(),
        "megaphone_source_at_start": source_at_start,
        "background_cpu_pct_before_run": round(background, 1),
        "python": platform.python_version(),
        "megaphone": command_output([megaphone_executable(), "--version"]),
        "nginx": command_output(["nginx", "-v"]) if set(NCHAN_TARGETS) & set(ran) else None,
        "nchan": (
            command_output(["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"])
            if set(NCHAN_TARGETS) & set(ran)
            else None
        ),
        "pushpin": command_output(["pushpin", "--version"]) if "pushpin" in ran else None,
        "redis_server": (
            command_output([REDIS_SERVER, "--version"])
            if any(t in REDIS_BACKED for t in ran)
            else None
        ),
        "hiredis": command_output(
            [sys.executable, "-c", "import hiredis; print(hiredis.__version__)"]
        )
        if any(t in REDIS_TARGETS for t in ran)
        else None,
        "rlimit_nofile": list(nofile),
        "server_cpu": SERVER_CPU if pinned(0) else None,
        "loadgen_cpu": LOADGEN_CPU if pinned(0) else None,
    }
    found = list(anomalies(passes))
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "environment": env,
        "plan": {**vars(plan), "repeat": args.repeat},
        "redis_mapping": REDIS_MAPPING,
        "skipped": skipped,
        "results": results,  # the median over the passes, number by number
        "passes": passes,
        "anomalies": found,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    redis_note = ""
    if any(t in REDIS_BACKED for t in ran):
        redis_note = (
            f"Redis targets: at most {plan.redis_readers:,} idle readers and "
            f"{plan.redis_max_channels:,} channels, {env['redis_server'].split(' sha=')[0]} · "
        )
    print(
        f"\n{report['started']} · nproc {env['nproc']} · {env['cpu_model']} · "
        f"server on CPU {env['server_cpu']}, load generator on CPU {env['loadgen_cpu']} · "
        f"workloads {','.join(plan.workloads)} · throughput {plan.duration:g} s · "
        f"idle readers {','.join(f'{n:,}' for n in plan.idle_sizes)} · "
        f"scale/resume/churn phases {plan.phase_duration:g} s · "
        f"{redis_note}"
        f"{'median of ' + str(args.repeat) + ' passes · ' if args.repeat > 1 else ''}"
        f"run took {elapsed:.0f} s · megaphone {env['megaphone_source']} · "
        f"background load before the run {background:.0f}% of one core\n"
    )
    if env["megaphone_source"] != source_at_start:
        print(
            f"warning: megaphone's source changed during the run (at the start: "
            f"{source_at_start}); the servers started later ran the newer code\n"
        )
    print(table(results, ran, all_rows(plan)))
    summary = transport_summary(results, plan)
    if summary:
        print("\nBrowser transports (issue #11: each within the NDJSON ratio to nchan):\n")
        print(summary)
    for target, reason in skipped.items():
        print(f"\n{target} skipped: {reason}")
    if found:
        print("\nAnomalies:")
        for line in found:
            print(f"- {line}")
    print(f"\nfull results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
