"""Shards in an S3 bucket, against a real S3 server (moto's standalone server on 127.0.0.1).

Nothing is mocked: the code under test talks HTTP to the server. The end-to-end test encodes into
the bucket (killed part-way, then finished by a rerun), verifies the bucket, trains two ranks
(torchrun, gloo) from it in both formats, kills the runs and resumes them, and checks that the
resumed losses are those of an uninterrupted run. The other tests feed it bad input: a missing
bucket, no credentials, a wrong endpoint, a prefix without manifest, a full or read-only cache
disk, an object deleted mid-epoch, and damaged shards (the same data checks as on local disk).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from s3_server import MotoServer
from shard_helpers import CLIP_FRAMES, clips_per_video, save_random_vae, write_inputs

from data_prep.verify import verify
from scd_train.data.manifest import ManifestError, load_manifest
from scd_train.data.shard_loader import ShardLoader
from scd_train.storage import (
    BadCacheDir,
    CacheSettings,
    MissingBucket,
    MissingObject,
    NoCredentials,
    RetryPolicy,
    Unreachable,
    open_location,
)
from scd_train.storage.cache import SHM_ROOT

BUCKET = "scd-latents"
TOTAL = sum(clips_per_video())
FAST_RETRY = RetryPolicy(attempts=3, first_delay_s=0.05)
TIMEOUT = 240

TRAIN_CONFIG = """
model: {{latent_channels: 4, latent_height: 4, latent_width: 4, patch_size: 1, width: 32, num_heads: 2,
        head_dim: 16, rope_axes: [4, 6, 6], encoder_layers: 1, decoder_layers: 1, layers: 2, num_actions: 4,
        max_frames: 16}}
diffusion: {{decoder_multi_batch: 1, sample_steps: 2}}
optim: {{lr: 1.0e-3, warmup_steps: 2}}
data: {{source: {fmt}, path: {path}, clip_frames: {frames}, batch_size: 2, num_workers: {workers},
       cache_dir: {cache}, cache_limit: {limit}}}
train: {{steps: {steps}, precision: fp32, device: cpu, backend: ddp, run_dir: {run_dir}, checkpoint_every: 4}}
log: {{wandb: disabled, progress_bar: false, every: 1}}
"""
STEPS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws(s3, monkeypatch, tmp_path):
    """This process's AWS settings point at the test server (environment only, as for users)."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3.env({}).items():
        monkeypatch.setenv(key, value)
    # streaming's lock files go to the temporary directory: keep them out of the machine's /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return s3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    save_random_vae(root / "vae")
    write_inputs(root / "videos")
    return root


def encode_cmd(python_exe: str, inputs: Path, out: str) -> list[str]:
    # one video per shard job: 10 jobs (uneven shards of 3 to 14 clips)
    return [python_exe, "-m", "data_prep", "encode", str(inputs / "videos"), "--vae", str(inputs / "vae"),
            "--out", out, "--size", "32", "--clip-frames", str(CLIP_FRAMES), "--stride", "2",
            "--videos-per-shard", "1", "--dtype", "float32", "--num-actions", "4", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def bucket_set(s3, inputs, tmp_path_factory) -> str:
    """encode -> killed part-way -> rerun: the set in the bucket, with what the kill left checked."""
    import sys

    from conftest import REPO_ROOT

    url = f"s3://{BUCKET}/train"
    env = s3.env({**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    cmd = encode_cmd(sys.executable, inputs, url)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if len([k for k in s3.keys(BUCKET, "train/records/")]) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = s3.keys(BUCKET, "train/")
    records = [k for k in killed if k.startswith("train/records/")]
    assert 3 <= len(records) < 10, f"the encode should have been killed part-way: {sorted(killed)}"
    assert "train/manifest.json" not in killed
    # every shard object a finished job lists is complete (uploads are atomic); none has a temporary name
    for rec_key in records:
        record = json.loads(s3.client().get_object(Bucket=BUCKET, Key=rec_key)["Body"].read())
        for shard in record["shards"]["webdataset"] + record["shards"]["mds"]:
            assert killed[f"train/{shard['path']}"] == shard["bytes"]
    assert not [k for k in killed if ".tmp-" in k]

    # the rerun in this process (a fresh interpreter costs more than the work left)
    from data_prep.cli import main as data_main

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert data_main(cmd[3:]) == 0
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert f"{len(records)} already complete" in out.getvalue()
    assert "manifest: s3://scd-latents/train/manifest.json" in out.getvalue()
    return url


def run_config(tmp_path: Path, name: str, fmt: str, url: str, workers: int = 0, cache: Path | None = None,
               limit: str | None = None, steps: int = STEPS) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TRAIN_CONFIG.format(fmt=fmt, path=url, frames=CLIP_FRAMES, workers=workers,
                                        cache=json.dumps(str(cache) if cache else None), limit=json.dumps(limit),
                                        steps=steps, run_dir=tmp_path / name))
    return path


def torchrun(python_exe: str, config: Path) -> list[str]:
    return [python_exe, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "scd_train.train", "--config", str(config)]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and everything under it at once: ranks (torchrun starts each in a session
    of its own), their DataLoader workers and helper processes, as a node failure would."""
    import psutil

    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=30)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def complete_checkpoint_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return 0
    state = run_dir / "checkpoints" / latest.read_text().strip() / "trainer_state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def streaming_memory_for(directory: Path) -> list[str]:
    """Names of the shared-memory segments streaming registered for ``directory`` (what a kill leaks)."""
    found = []
    for locals_file in SHM_ROOT.glob("[0-9]*_locals"):
        data = locals_file.read_bytes()
        size = int.from_bytes(data[:4], "little")
        if any(d.startswith(str(directory)) for d in data[4:size].decode().split("\0")[:-1]):
            prefix = locals_file.name.split("_", 1)[0]
            found += sorted(p.name for p in SHM_ROOT.glob(f"{prefix}_*"))
    return found


@pytest.fixture(scope="module")
def uninterrupted(s3, bucket_set, tmp_path_factory) -> dict[int, float]:
    """Two ranks, webdataset from the bucket, straight through: the reference losses."""
    import sys

    from conftest import REPO_ROOT

    tmp = tmp_path_factory.mktemp("straight")
    env = s3.env({**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                  "TMPDIR": str(tmp)})
    done = subprocess.run(torchrun(sys.executable, run_config(tmp, "straight", "webdataset", bucket_set)),
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]
    ref = losses(tmp / "straight")
    assert sorted(ref) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in ref.values())
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_bucket_encode_verify_train_kill_resume(fmt, s3, bucket_set, uninterrupted, tmp_path, python_exe,
                                                subprocess_env, monkeypatch):
    for key, value in s3.env({}).items():
        monkeypatch.setenv(key, value)
    report = verify(bucket_set, [fmt], progress=False, retry=FAST_RETRY)
    assert report.ok and report.samples == TOTAL, report.problems

    # MDS: streaming's cache on local disk, with a limit that forces evictions (10 shards, room for ~5)
    cache = tmp_path / "cache" if fmt == "mds" else None
    limit = "72kb" if fmt == "mds" else None
    config = run_config(tmp_path, "run", fmt, bucket_set, workers=2, cache=cache, limit=limit)
    env = s3.env({**subprocess_env, "WANDB_MODE": "disabled", "TMPDIR": str(tmp_path)})
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(torchrun(python_exe, config), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while complete_checkpoint_step(tmp_path / "run") < 4:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.02)
    finally:
        kill_tree(proc)
    saved = complete_checkpoint_step(tmp_path / "run")
    assert 4 <= saved < STEPS, "the run should have been killed part-way"
    leaked = streaming_memory_for(cache) if cache else []

    resumed = subprocess.run(torchrun(python_exe, config), env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"at step {saved}" in resumed.stderr
    ours = losses(tmp_path / "run")
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in range(saved + 1, STEPS + 1):  # the same batches on each rank as without the kill
        assert math.isclose(ours[step], uninterrupted[step], rel_tol=1e-6), (step, ours[step], uninterrupted[step])
    if fmt == "mds":
        if leaked:  # what the kill left was found and removed, so the resumed run could start
            assert "shared-memory segment(s) a killed run left" in resumed.stderr
        assert not streaming_memory_for(cache) or not set(streaming_memory_for(cache)) & set(leaked)
        assert any(cache.rglob("*.mds")) and not [p for p in cache.rglob("*") if ".tmp" in p.name]


def test_mds_cache_limit_evicts_least_recently_used_shards(aws, bucket_set, tmp_path):
    manifest = load_manifest(bucket_set, retry=FAST_RETRY)
    sizes = [e.bytes for e in manifest.shards_for("mds")]
    limit = 4 * max(sizes) + 2048  # room for 4 of the 10 shards: a full epoch must evict
    assert sum(sizes) > limit
    cache = tmp_path / "cache"
    loader = ShardLoader(manifest, "mds", batch_size=2, seed=0, clip_frames=CLIP_FRAMES, use_actions=True,
                         cache=CacheSettings(str(cache), limit))
    seen = set()
    for batch, _ in zip(loader, range(loader.batches_per_epoch)):
        seen.update(batch.keys)
        # one reader downloads one shard at a time, so the limit is never exceeded (concurrent readers of a
        # node may each overshoot it by the shard they are fetching)
        assert sum(p.stat().st_size for p in cache.rglob("*.mds")) <= limit
    assert len(seen) == loader.batches_per_epoch * 2  # every sample of the epoch was served


# -- bad input ---------------------------------------------------------------------------------------

def test_missing_bucket_and_prefix_without_manifest_name_the_url(aws, bucket_set):
    with pytest.raises(MissingBucket) as err:
        load_manifest("s3://no-such-bucket/train", retry=FAST_RETRY)
    assert "s3://no-such-bucket/train" in str(err.value) and aws.endpoint in str(err.value)
    assert "AWS_ENDPOINT_URL" in str(err.value)
    with pytest.raises(ManifestError, match=r"nothing is stored under that prefix"):
        load_manifest(f"s3://{BUCKET}/nothing-here", retry=FAST_RETRY)
    # a prefix that holds shards but no manifest: an encode that never finished
    aws.client().put_object(Bucket=BUCKET, Key="half/records/shard-000000.json", Body=b"{}")
    with pytest.raises(ManifestError) as err:
        load_manifest(f"s3://{BUCKET}/half", "data.path", retry=FAST_RETRY)
    assert f"data.path='s3://{BUCKET}/half'" in str(err.value) and "holds 1 object(s) but no manifest.json" in str(
        err.value)


def test_no_credentials_is_refused_before_any_request(aws, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    with pytest.raises(NoCredentials) as err:
        load_manifest(f"s3://{BUCKET}/train", retry=FAST_RETRY)
    assert f"s3://{BUCKET}/train" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_refused_credentials_name_the_endpoint_and_what_to_check(monkeypatch, tmp_path):
    from scd_train.storage import AccessDenied

    strict = MotoServer(tmp_path / "moto.log", check_credentials=True)
    try:
        for key, value in strict.env({}).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(AccessDenied) as err:
            load_manifest(f"s3://{BUCKET}/train", retry=FAST_RETRY)
    finally:
        strict.stop()
    message = str(err.value)
    assert f"s3://{BUCKET}/train/manifest.json" in message and strict.endpoint in message
    assert "refused access" in message and "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE" in message


def test_wrong_endpoint_is_retried_with_backoff_then_named(aws, monkeypatch, caplog):
    from s3_server import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    caplog.set_level(logging.WARNING, logger="scd_train.storage")
    start = time.monotonic()
    with pytest.raises(Unreachable) as err:
        open_location(f"s3://{BUCKET}/train/manifest.json", FAST_RETRY).read_bytes()
    assert time.monotonic() - start >= 0.05 + 0.1  # it waited between attempts
    message = str(err.value)
    assert f"s3://{BUCKET}/train/manifest.json" in message and dead in message and "after 3 attempt(s)" in message
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2 and "attempt 1 of 3" in retries[0] and "attempt 2 of 3" in retries[1]


def test_cli_errors_are_one_line_with_exit_codes(aws, capsys, tmp_path):
    from data_prep.cli import main as data_main
    from scd_train.train import main as train_main

    assert data_main(["verify", "s3://no-such-bucket/x", "--retries", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scd-data verify: s3://no-such-bucket/x") and "\n" not in err and "Traceback" not in err
    assert train_main(["--config", "configs/tiny.yaml", "data.source=mds", "data.path=s3://no-such-bucket/x",
                       "train.device=cpu", "log.wandb=disabled", "data.remote_retries=1",
                       f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, capture_output=True)


@pytest.fixture
def small_disks(tmp_path):
    """A 64 kB file system and a read-only one (real mounts: the suite runs as root)."""
    full, read_only = tmp_path / "full", tmp_path / "ro"
    _mount_tmpfs(full, "size=64k")
    _mount_tmpfs(read_only, "ro,size=1m")
    try:
        yield full, read_only
    finally:
        for path in (full, read_only):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)  # detach even if still busy


def test_cache_dir_on_a_full_or_read_only_disk_is_refused(aws, bucket_set, small_disks):
    full, read_only = small_disks
    manifest = load_manifest(bucket_set, retry=FAST_RETRY)
    args = dict(batch_size=2, seed=0, clip_frames=CLIP_FRAMES, use_actions=True)
    with pytest.raises(BadCacheDir) as err:
        ShardLoader(manifest, "mds", cache=CacheSettings(str(full)), **args)
    assert f"data.cache_dir='{full}'" in str(err.value) and "MB free but caching" in str(err.value)
    assert bucket_set in str(err.value) and "data.cache_limit" in str(err.value)
    with pytest.raises(BadCacheDir) as err:
        ShardLoader(manifest, "mds", cache=CacheSettings(str(read_only)), **args)
    assert "Read-only file system" in str(err.value) and f"data.cache_dir='{read_only}'" in str(err.value)
    with pytest.raises(BadCacheDir, match=r"data.cache_limit=1000 bytes is below 4x the largest shard"):
        ShardLoader(manifest, "mds", cache=CacheSettings(str(full.parent / "cache"), 1000), **args)


@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_object_deleted_mid_epoch_stops_naming_it(fmt, aws, bucket_set, tmp_path):
    url = f"s3://{BUCKET}/deleted-{fmt}"
    client = aws.client()
    for key in aws.keys(BUCKET, "train/"):  # a copy of the set, made inside the server
        client.copy_object(Bucket=BUCKET, Key=f"deleted-{fmt}/{key[len('train/'):]}",
                           CopySource={"Bucket": BUCKET, "Key": key})
    manifest = load_manifest(url, retry=FAST_RETRY)
    loader = ShardLoader(manifest, fmt, batch_size=2, seed=0, clip_frames=CLIP_FRAMES, use_actions=True,
                         on_corrupt="skip", max_corrupt_skips=100, cache=CacheSettings(str(tmp_path / "cache")))
    batches = iter(loader)
    first = next(batches)
    # a shard no sample of the first batch came from, deleted behind the loader's back
    used = {loader.plan.locate(int(i))[0] for i in loader.plan.rank_order(0)[:2]}
    victim = next(e for i, e in enumerate(manifest.shards_for(fmt)) if i not in used)
    aws.client().delete_object(Bucket=BUCKET, Key=f"deleted-{fmt}/{victim.path}")
    with pytest.raises(MissingObject) as err:
        for _ in range(loader.batches_per_epoch):
            next(batches)
    assert f"{url}/{victim.path}" in str(err.value)
    assert err.value.rank_local  # only this rank read it, so this rank prints it (scd_train.cli)
    assert loader.corrupt_skips == 0  # never mistaken for corrupt data and skipped
    assert first.latents.shape[0] == 2


def damaged_copy(aws, name: str, damage, tmp_path: Path) -> str:
    """The bucket's set copied to the prefix ``name`` through a local directory, where ``damage(root)``
    alters it the way tests/bad_data.py does (keeping the manifest's sizes and hashes consistent)."""
    client, local = aws.client(), tmp_path / name
    for key in aws.keys(BUCKET, "train/"):
        target = local / key[len("train/"):]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target))
    damage(local)
    for path in (p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{name}/{path.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/{name}"


def test_the_data_checks_run_on_a_bucket_too(aws, bucket_set, tmp_path):
    """Per-job MDS index, tar layout, the start-up spot check and verify's statistics, on s3:// paths."""
    from bad_data import append_copy_of_first, bump_mds_index, every_sample, every_tar, first_tar, rewrite_tar

    from scd_train.config import load_config
    from scd_train.data.shards import build_shard_loader

    def index_and_layout(root: Path) -> None:
        bump_mds_index(root)
        rewrite_tar(root, first_tar(root), append_copy_of_first)

    url = damaged_copy(aws, "bad-layout", index_and_layout, tmp_path)
    manifest = load_manifest(url, retry=FAST_RETRY)
    with pytest.raises(ManifestError, match=rf"MDS index {url}/mds/shard-000000/index.json records \d+ samples"):
        ShardLoader(manifest, "mds", batch_size=2, seed=0, clip_frames=CLIP_FRAMES, use_actions=True,
                    cache=CacheSettings(str(tmp_path / "cache")))
    problems = verify(url, progress=False, retry=FAST_RETRY).problems
    assert any(p.startswith(f"MDS index {url}/mds/shard-000000/index.json records") for p in problems), problems
    assert any(f"corrupt data in shard {url}/webdataset/shard-000000.tar" in p and "not contiguous" in p
               for p in problems), problems

    url = damaged_copy(aws, "rescaled", lambda r: every_tar(r, every_sample(latents=lambda a: a * 6)), tmp_path)
    cfg = load_config(run_config(tmp_path, "spot", "webdataset", url))
    with pytest.raises(ManifestError, match=rf"data.path={url}: \d+ sampled clips have normalized mean"):
        build_shard_loader(cfg, rank=0, world_size=1)
    problems = verify(url, ["webdataset"], progress=False, retry=FAST_RETRY).problems
    assert any("the stored latents have mean" in p for p in problems), problems


def test_only_transient_failures_are_retried_and_sizes_parse():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from scd_train.storage import parse_size
    from scd_train.storage.retry import is_transient

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(client_error("SlowDown", 503)) and is_transient(client_error("InternalError", 500))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    for code, status in (("NoSuchKey", 404), ("AccessDenied", 403), ("InvalidAccessKeyId", 403)):
        assert not is_transient(client_error(code, status))
    wrapped = OSError("wrapped by s3fs")
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert is_transient(wrapped)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert RetryPolicy(attempts=3, first_delay_s=0.0).call(flaky, "read x") == "ok" and len(calls) == 3
    with pytest.raises(FileNotFoundError):  # not transient: one attempt only
        RetryPolicy(attempts=5, first_delay_s=0.0).call(lambda: calls.append(1) or open("/nonexistent/x"), "read")
    assert len(calls) == 4
    assert [RetryPolicy(6, 0.5, 8.0).delay(i) for i in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert parse_size("20gb") == 20 * 1024 ** 3 and parse_size("512MB") == 512 * 1024 ** 2 and parse_size(None) is None
    with pytest.raises(ValueError, match=r"data.cache_limit='lots': expected a size"):
        parse_size("lots")


def _register_streaming_memory(prefix: int, local_dir: Path) -> list[Path]:
    """What a killed StreamingDataset leaves in /dev/shm: its locals record and its arrays."""
    text = f"{os.path.abspath(local_dir)}\0{prefix}".encode()
    segments = [SHM_ROOT / f"{prefix:06d}_locals", SHM_ROOT / f"{prefix:06d}_barrier",
                SHM_ROOT / f"{prefix:06d}_shard_states"]
    segments[0].write_bytes((4 + len(text)).to_bytes(4, "little") + text)
    for seg in segments[1:]:
        seg.write_bytes(b"\0" * 64)
    return segments


def test_cache_entry_removes_what_a_dead_run_left_and_refuses_a_live_one(tmp_path, caplog):
    from scd_train.storage.cache import CacheEntry, entry_name

    url = f"s3://{BUCKET}/train"
    expected = {"mds/shard-000000/shard.00000.mds": 100, "mds/shard-000001/shard.00000.mds": 50, "mds/index.json": -1}
    settings = CacheSettings(str(tmp_path / "cache"))
    path = settings.root / entry_name(url, "f" * 64)
    older = settings.root / entry_name(url, "0" * 64)  # the same URL, encoded again since
    other = settings.root / entry_name(f"s3://{BUCKET}/holdout", "1" * 64)  # another set: kept
    for folder in (path / "mds" / "shard-000000", path / "mds" / "shard-000001", older / "mds", other / "mds"):
        folder.mkdir(parents=True)
    (path / "mds" / "shard-000000" / "shard.00000.mds").write_bytes(b"x" * 100)  # intact: kept
    (path / "mds" / "shard-000001" / "shard.00000.mds").write_bytes(b"x" * 20)  # truncated
    (path / "mds" / "shard-000001" / "shard.00000.mds.3f9a1c").write_bytes(b"x")  # a half-finished download
    (path / "mds" / "index.json").write_text("{}")
    (older / "mds" / "index.json").write_text("{}")
    (other / "mds" / "index.json").write_text("{}")
    ours = _register_streaming_memory(999_990, path / "mds")
    theirs = _register_streaming_memory(999_991, other / "mds")
    try:
        caplog.set_level(logging.WARNING, logger="scd_train.storage")
        entry = CacheEntry(settings, url, "f" * 64, expected, local_leader=True)
        left = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        assert left == [".in-use.lock", "mds/index.json", "mds/shard-000000/shard.00000.mds"]
        assert not older.exists() and (other / "mds" / "index.json").is_file()
        assert not any(seg.exists() for seg in ours) and all(seg.exists() for seg in theirs)
        assert "removed 3 shared-memory segment(s) a killed run left" in caplog.text
        with pytest.raises(BadCacheDir, match=r"in use by another running job on this node"):
            CacheEntry(settings, url, "f" * 64, expected, local_leader=True)
        entry.close()
        CacheEntry(settings, url, "f" * 64, expected, local_leader=True).close()  # free again once released
    finally:
        for seg in ours + theirs:
            seg.unlink(missing_ok=True)
