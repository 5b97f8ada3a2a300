"""Without network, ssl-eval knows within seconds and says in one line what to download.

The CLI runs in a subprocess whose network is made unreachable on purpose, in three ways: names
do not resolve (as on a machine with no network), every connection goes to a proxy at a closed
port (refused at once), or to a proxy that accepts and never answers (a network that drops
packets; urllib has no timeout of its own). Before the probe of ``core/network.py`` the first
two spent ~31 s in huggingface_hub's five retries (``Retrying in 8s [Retry 5/5]``) and the
third hung; now each ends in one error line a couple of seconds after the backbone step starts.
Offline switches (``HF_HUB_OFFLINE``, ``--offline``) skip even the probe, and weights in the
Hugging Face or torch.hub cache load with the network cut off at the socket.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import cli_env

from ssl_eval.backbones.weights import WeightsSource
from ssl_eval.core import network
from ssl_eval.core.errors import UserError

OFFLINE_VARS = ("SSL_EVAL_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = tuple(
    v
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    for v in (name, name.upper())
)
SECONDS_AFTER_BUILD = 8  # the probe (2 s) and slack for a busy machine; the retries took ~31 s

# runs the CLI (or builds backbones) in a process whose network is cut off as asked
NETLESS = r"""
import socket, sys

mode, what, args = sys.argv[1], sys.argv[2], sys.argv[3:]
real_getaddrinfo = socket.getaddrinfo

def no_dns(host, *a, **k):
    if host in ("localhost", "127.0.0.1", "::1"):
        return real_getaddrinfo(host, *a, **k)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

def no_connect(*a, **k):
    raise OSError(101, "Network is unreachable (cut off by the test)")

if mode in ("nodns", "cut"):
    socket.getaddrinfo = no_dns
if mode == "cut":
    socket.socket.connect = no_connect
    socket.create_connection = no_connect

if what == "cli":
    from ssl_eval.cli import main
    sys.exit(main(args))
from ssl_eval.backbones import BuildOptions, build_backbone
for name in args:
    bb = build_backbone(name, BuildOptions())
    print(name, bb.weights.path, flush=True)
"""


@pytest.fixture(autouse=True)
def _fresh_probes(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    network.forget_probes()
    yield
    network.forget_probes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SilentProxy:
    """A local port that accepts connections and never answers (a network that swallows
    packets), counting the connections made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.accepted:
            c.close()


def _netless(tmp_path, mode, what, args, env=None, timeout=90):
    """Run NETLESS; return (exit code, stderr lines, seconds from the backbone step to the
    error line, stdout)."""
    script = tmp_path / "netless.py"
    script.write_text(NETLESS)
    e = cli_env(tmp_path)
    for var in OFFLINE_VARS + PROXY_VARS:
        e.pop(var, None)
    e.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, what, *args],
        stdout=subprocess.PIPE if what == "build" else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
        cwd=tmp_path,
    )
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    lines, started, ended = [], None, None
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if started is None and line.startswith("building backbone"):
                started = time.monotonic()
            if ended is None and line.startswith("ssl-eval: error"):
                ended = time.monotonic()
        out = proc.stdout.read() if proc.stdout else ""
        rc = proc.wait()
    finally:
        killer.cancel()
    took = None if None in (started, ended) else ended - started
    return rc, lines, took, out


def _run_args(tmp_path, backbone, *extra):
    return [
        "run",
        "--backbone",
        backbone,
        "--protocol",
        "linear",
        "--results-dir",
        str(tmp_path / "r"),
        "--cache-dir",
        str(tmp_path / "c"),
        *extra,
    ]


def _assert_one_quick_line(rc, lines, took, *expected):
    text = "\n".join(lines)
    assert rc == 2, text[-2000:]
    assert "Retry" not in text and "Traceback" not in text, text[-2000:]
    after = lines[[i for i, x in enumerate(lines) if x.startswith("building backbone")][0] + 1 :]
    assert len(after) == 1 and after[0].startswith("ssl-eval: error: weights not found"), after
    for part in expected:
        assert part in after[0], after[0]
    assert took < SECONDS_AFTER_BUILD, f"{took:.1f} s from 'building backbone' to the error"


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone, mode, expected",
    [
        # the design card's command on a machine without network: the report of issue 22
        (
            "dinov2",
            "nodns",
            (
                "no network (huggingface.co unreachable",
                "dinov2_vits14_pretrain.pth",
                "`hf download timm/vit_small_patch14_dinov2.lvd142m model.safetensors`",
            ),
        ),
        # a timm name, every connection refused (a proxy at a closed port)
        (
            "timm:resnet18.a1_in1k",
            "refused",
            ("github.com unreachable", "`hf download timm/resnet18.a1_in1k model.safetensors`"),
        ),
        # a torch.hub address only, and a network that swallows packets: urllib would hang
        (
            "cifar_resnet20",
            "silent",
            ("github.com unreachable: no answer in 2 s", "hub/checkpoints/resnet20-12fca82f.th"),
        ),
    ],
)
def test_no_network_ends_in_one_line_within_seconds(tmp_path, backbone, mode, expected):
    env, srv = {}, None
    if mode == "refused":
        env = {v: f"http://127.0.0.1:{_free_port()}" for v in ("HTTP_PROXY", "HTTPS_PROXY")}
    if mode == "silent":
        srv = _SilentProxy()
        env = {v: srv.url for v in ("HTTP_PROXY", "HTTPS_PROXY")}
    try:
        rc, lines, took, _ = _netless(tmp_path, mode, "cli", _run_args(tmp_path, backbone), env)
    finally:
        if srv is not None:
            srv.close()
    _assert_one_quick_line(rc, lines, took, *expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "env, flag, why",
    [
        ({"HF_HUB_OFFLINE": "1"}, [], "offline (HF_HUB_OFFLINE=1)"),
        ({}, ["--offline"], "offline (--offline)"),
    ],
)
def test_offline_switch_skips_even_the_probe(tmp_path, env, flag, why):
    # behind a silent proxy: anything that tried the network (the probe included) would wait
    srv = _SilentProxy()
    env = {**env, **{v: srv.url for v in ("HTTP_PROXY", "HTTPS_PROXY")}}
    try:
        rc, lines, took, _ = _netless(
            tmp_path, "silent", "cli", _run_args(tmp_path, "dinov2", *flag), env
        )
    finally:
        srv.close()
    _assert_one_quick_line(
        rc, lines, took, why, "dinov2_vits14_pretrain.pth", "hf download timm/vit_small"
    )
    assert srv.accepted == [], "the network was tried although offline was asked for"


@pytest.mark.slow
def test_weights_in_the_hub_caches_load_with_the_network_cut_off(tmp_path):
    import timm
    from safetensors.torch import save_file
    from test_checkpoint_formats import cifar_state_dict

    # Hugging Face's cache layout, as hf_hub_download leaves it: refs/main -> snapshot -> blob
    repo = tmp_path / "hf_home" / "hub" / "models--timm--test_vit.r160_in1k"
    commit, blob = "0" * 40, "b" * 64
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    model = timm.create_model("test_vit.r160_in1k", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, repo / "blobs" / blob)
    os.symlink(f"../../blobs/{blob}", repo / "snapshots" / commit / "model.safetensors")
    # torch.hub's cache: $TORCH_HOME/hub/checkpoints/<basename of the official address>
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save({"state_dict": cifar_state_dict(3)}, hub / "resnet20-12fca82f.th")

    rc, lines, _, out = _netless(
        tmp_path, "cut", "build", ["timm:test_vit.r160_in1k", "cifar_resnet20"]
    )
    assert rc == 0, "\n".join(lines)[-2000:]
    assert f"timm:test_vit.r160_in1k {repo / 'snapshots' / commit / 'model.safetensors'}" in out
    assert f"cifar_resnet20 {hub / 'resnet20-12fca82f.th'}" in out
    assert "Retry" not in "\n".join(lines)


# in-process: the probe itself


def test_offline_reason_reads_the_switches_as_huggingface_hub_does(monkeypatch):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert network.offline_reason() is None and network.offline_reason(True) == "--offline"
    for value in ("0", "false", "", "no"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert network.offline_reason() is None, value
    for var, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("SSL_EVAL_OFFLINE", "yes"),
        ("TRANSFORMERS_OFFLINE", "TRUE"),
    ):
        monkeypatch.setenv(var, value)
        assert network.offline_reason() == f"{var}={value}"
        monkeypatch.delenv(var)


@pytest.mark.slow
def test_probe_is_bounded_concurrent_and_asked_once_per_host(monkeypatch):
    a, b = _SilentProxy(), _SilentProxy()
    urls = [f"{s.url}/x.pth" for s in (a, b)]
    try:
        t0 = time.monotonic()
        why = network.unreachable_many(urls, timeout=0.5)
        took = time.monotonic() - t0
    finally:
        a.close()
        b.close()
    assert all(w and "no answer in 0.5 s" in w for w in why.values()), why
    assert took < 1.5, f"{took:.2f} s for two silent hosts probed at once"
    calls = []
    monkeypatch.setattr(network, "_probe", lambda root, t: calls.append(root))
    assert network.unreachable(urls[0]) == why[urls[0]] and calls == []  # remembered


@pytest.mark.slow
def test_a_host_that_answers_at_all_is_reachable():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert network.unreachable(f"http://127.0.0.1:{srv.server_port}/w.pth") is None
        assert "refused" in network.unreachable(f"http://127.0.0.1:{_free_port()}/w.pth").lower()
    finally:
        srv.shutdown()
        srv.server_close()


def test_unreachable_hosts_are_never_handed_to_the_download_clients(monkeypatch):
    import huggingface_hub
    import torch.hub

    def never(*a, **k):
        raise AssertionError("a download client was called although its host is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    monkeypatch.setattr(torch.hub, "download_url_to_file", never)
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    closed = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    src = WeightsSource(("w.pth",), hf_repo="timm/some_model.tag", url=f"{closed}/w.pth")
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        src.resolve(None, offline=False)
    assert time.monotonic() - t0 < 3
    msg = str(e.value)
    assert msg.startswith("weights not found: no network (127.0.0.1:") and "\n" not in msg
    assert "`hf download timm/some_model.tag model.safetensors`" in msg and "w.pth" in msg


def test_hf_and_openclip_hub_names_probe_before_the_hub_client(monkeypatch):
    import huggingface_hub

    from ssl_eval.backbones import BuildOptions
    from ssl_eval.backbones.families import hf, openclip

    def snapshot(*a, local_files_only=False, **k):
        if local_files_only:
            raise FileNotFoundError("not cached")
        raise AssertionError("snapshot_download was called although the hub is unreachable")

    def never(*a, **k):
        raise AssertionError("hf_hub_download was called although the hub is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    port = _free_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match=rf"127\.0\.0\.1:{port} unreachable.*download org/absent"):
        hf.resolve_folder("org/absent", BuildOptions())
    with pytest.raises(UserError, match=rf"127\.0\.0\.1:{port} unreachable.*download org/absent"):
        openclip._hub_file("org/absent", "open_clip_config.json", BuildOptions())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # "0" is online, as huggingface_hub reads it
    with pytest.raises(UserError, match="unreachable"):
        hf.resolve_folder("org/absent", BuildOptions())
