"""Input files that are not regular files (a FIFO, /dev/zero, a socket), or are huge, are named in one line before
anything reads them; a run lock on a full disk is one line too. All with the real thing: real FIFOs, devices, sparse
files, sockets and a real full file system; a deadline turns a hang into a failure."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musubi_tuner.data.config import read_config_file
from musubi_tuner.errors import UserError
from musubi_tuner import files
from musubi_tuner.files import RunLock, StateDictFile, load_torch_file, require_file
from musubi_tuner.tomlio import load_toml
from musubi_tuner.training.sample_prompts import load_sample_prompts

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def deadline(seconds: int = 10):
    """A read that blocks (a FIFO) or never ends (/dev/zero) fails the test instead of hanging it."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def zero(path: Path) -> Path:
    path.symlink_to("/dev/zero")
    return path


def sparse(path: Path, size: int = 2**40) -> Path:
    path.write_bytes(b"")
    os.truncate(path, size)  # 1 TiB that takes no disk
    return path


@pytest.fixture
def bound_socket(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        path = tmp_path / "sock.safetensors"
        s.bind(str(path))
        yield path


@pytest.mark.parametrize("make, kind", [(fifo, "a FIFO"), (zero, "a character device")])
@pytest.mark.parametrize("name", ["lora.safetensors", "dit.pt"])
def test_a_model_file_that_is_not_a_regular_file_is_named_without_reading_it(tmp_path, make, kind, name):
    path = make(tmp_path / name)
    with deadline(), pytest.raises(UserError) as e:
        StateDictFile(path, what="LoRA file")
    assert str(e.value) == f"{path}: not a regular file ({kind}); expected a LoRA file"
    with deadline(), pytest.raises(UserError, match=rf"not a regular file \({kind}\); expected a DiT checkpoint \(--dit\)"):
        require_file(path, "DiT checkpoint", "--dit")
    with deadline(), pytest.raises(UserError, match=rf"not a regular file \({kind}\)"):
        load_torch_file(path)


def test_a_socket_as_a_model_file_is_named(bound_socket):
    with deadline(), pytest.raises(UserError, match=r"sock\.safetensors: not a regular file \(a socket\); expected a LoRA file"):
        StateDictFile(bound_socket, what="LoRA file")


def test_broken_and_looping_links_are_named_as_such(tmp_path):
    (tmp_path / "broken.pt").symlink_to(tmp_path / "gone.pt")
    with pytest.raises(UserError, match=r"broken\.pt: broken symbolic link \(to .*gone\.pt, which does not exist\) \(--dit\)"):
        require_file(tmp_path / "broken.pt", "DiT checkpoint", "--dit")
    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    with pytest.raises(UserError, match=r"a\.pt: symbolic link loop"):
        require_file(tmp_path / "a.pt")


@pytest.mark.parametrize("make, reason", [
    (fifo, r"not a regular file \(a FIFO\); expected a dataset config"),
    (zero, r"not a regular file \(a character device\); expected a dataset config"),
    (sparse, r"1 TiB, too large for a dataset config \(at most 64 MiB\)"),
])
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_dataset_config_that_is_not_a_regular_file_or_is_huge_is_named(tmp_path, make, reason, suffix):
    path = make(tmp_path / f"dataset{suffix}")
    with deadline(), pytest.raises(UserError, match=rf"^{path}: {reason}$"):
        read_config_file(path)


def test_a_socket_as_a_dataset_config_is_not_called_a_folder(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "dataset.toml"))
        with deadline(), pytest.raises(UserError, match=r"dataset\.toml: not a regular file \(a socket\); expected a dataset config$"):
            read_config_file(tmp_path / "dataset.toml")


@pytest.mark.parametrize("make, reason", [
    (fifo, r"not a regular file \(a FIFO\); expected a sample prompt file \(--sample_prompts\)"),
    (zero, r"not a regular file \(a character device\); expected a sample prompt file \(--sample_prompts\)"),
    (sparse, r"1 TiB, too large for a sample prompt file \(at most 64 MiB\) \(--sample_prompts\)"),
])
@pytest.mark.parametrize("suffix", [".txt", ".toml", ".json"])
def test_a_sample_prompt_file_that_is_not_a_regular_file_or_is_huge_is_named(tmp_path, make, reason, suffix):
    path = make(tmp_path / f"prompts{suffix}")
    with deadline(), pytest.raises(UserError, match=rf"^{path}: {reason}$"):
        load_sample_prompts(path)


def test_load_toml_reads_no_fifo_and_no_device(tmp_path):
    with deadline(), pytest.raises(UserError, match=r"not a regular file \(a FIFO\); expected a file$"):
        load_toml(fifo(tmp_path / "config.toml"))
    with deadline(), pytest.raises(UserError, match=r"not a regular file \(a character device\)"):
        load_toml(zero(tmp_path / "zero.toml"))


def test_read_small_file_reads_a_small_regular_file_and_bounds_the_rest(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello")
    assert files.read_small_file(tmp_path / "a.txt") == b"hello"
    (tmp_path / "b.txt").write_bytes(b"x" * 11)
    with pytest.raises(UserError, match=r"b\.txt: 11 bytes, too large for a caption file \(at most 10 bytes\) \(for b\.png\)"):
        files.read_small_file(tmp_path / "b.txt", "caption file", "for b.png", max_bytes=10)


# ------------------------------------------------------------------------------------------ a run lock on a full disk


@pytest.fixture
def full_filesystem(tmp_path):
    """A real tmpfs of 64 KiB, filled: a new file can be made (tmpfs counts inodes apart) but not written to."""
    mount = tmp_path / "full"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                                        capture_output=True).returncode:
        pytest.skip("needs to mount a tmpfs (root with CAP_SYS_ADMIN, and mount)")
    try:
        with open(mount / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_run_lock_on_a_full_disk_is_one_line_and_leaves_no_lock_file(full_filesystem):
    out = full_filesystem / "out"
    out.mkdir()
    lock = RunLock(out / ".musubi-train.lock", "training run", "--output_dir")
    with pytest.raises(UserError) as e:
        lock.acquire()
    assert str(e.value) == (f"{out / '.musubi-train.lock'}: cannot write the lock file (No space left on device); check free "
                            f"space and permissions of {out}, or choose another --output_dir")
    assert list(out.iterdir()) == []
    (full_filesystem / "filler").unlink()  # with room again, the same lock is taken and released
    with RunLock(out / ".musubi-train.lock", "training run", "--output_dir"):
        assert (out / ".musubi-train.lock").stat().st_size > 0
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------ no home folder


def without_home(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` run as a user without a passwd entry and without HOME (some containers): Path.home() cannot work."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run as a user without a passwd entry")
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME")}
    env["PYTHONPATH"] = str(ROOT / "src")
    os.chmod(cwd, 0o777)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, user=54321, group=54321, extra_groups=[],
                          capture_output=True, text=True, timeout=120)


def test_the_plan_trace_cache_is_skipped_when_no_home_folder_can_be_found(tmp_path):
    done = without_home(
        "from musubi_tuner.planning.tracer import on_disk\n"
        "print(on_disk('k', [], lambda: 'traced', lambda d: 'loaded'))\n", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "traced", done.stderr


def test_a_tilde_in_a_dataset_config_without_a_home_folder_is_one_line(tmp_path):
    (tmp_path / "ds.toml").write_text('[[datasets]]\nimage_directory = "~/images"\ncaption_extension = ".txt"\n')
    done = without_home(
        "from musubi_tuner.data.config import load_dataset_config\nfrom musubi_tuner.errors import UserError\n"
        "try:\n    load_dataset_config('ds.toml')\nexcept UserError as e:\n    print(e)\n", tmp_path)
    assert done.stdout.strip() == ('ds.toml: [[datasets]][0].image_directory = "~/images": cannot expand ~ (no HOME); '
                                   'write the full path'), done.stderr


def test_a_text_encoder_folder_that_cannot_be_listed_is_not_called_one_without_weights():
    """Path.glob returns nothing for a folder it cannot list: the folder was reported as holding no weight files."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run as a user who may enter the folder but not list it")
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))  # (pytest's folders are root's alone: not passable)
    try:
        os.chmod(folder, 0o755)
        (folder / "te").mkdir()
        files.save_safetensors({"w": torch.zeros(1)}, folder / "te" / "model.safetensors")
        os.chmod(folder / "te", 0o311)
        code = ("from musubi_tuner.errors import UserError\nfrom musubi_tuner.hunyuan.text_encoders import WeightFiles\n"
                "try:\n    WeightFiles('te', 'text encoder')\nexcept UserError as e:\n    print(e)\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                              user=54321, group=54321, extra_groups=[], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "te: cannot list this text encoder folder (Permission denied)", done.stderr[-2000:]
    finally:
        shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------ permissions of a rewrite


def test_a_file_its_owner_could_not_read_is_rewritten_readable_by_a_user_who_is_not_root(tmp_path):
    """--skip_existing rewrites a cache it cannot read (mode 000). The temporary file took the old mode before it was
    written, so a user other than root could not write it: the whole caching run stopped at that cache."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run as another user (root reads and writes any file)")
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))  # (pytest's folders are root's alone: not passable)
    try:
        (folder / "x_hv.safetensors").write_bytes(b"old")
        for path in (folder, folder / "x_hv.safetensors"):
            os.chown(path, 54321, 54321)
        os.chmod(folder / "x_hv.safetensors", 0o000)
        code = ("import os\nos.umask(0o022)\nfrom musubi_tuner.files import atomic_write\n"
                "with atomic_write('x_hv.safetensors') as tmp:\n    open(tmp, 'wb').write(b'new')\n"
                "print(oct(os.stat('x_hv.safetensors').st_mode & 0o777), open('x_hv.safetensors', 'rb').read())\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                              user=54321, group=54321, extra_groups=[], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.split() == ["0o644", "b'new'"], done.stderr[-2000:]
    finally:
        shutil.rmtree(folder)


def _safetensors_bytes(header: dict | str, data: bytes, encoding: str = "utf-8") -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode(encoding)
    return struct.pack("<Q", len(raw)) + raw + data


A = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
B = {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}
DATA = bytes(range(24))


def test_a_dtype_the_format_has_and_no_model_holds_is_named_not_called_malformed(tmp_path):
    """complex64 is a safetensors dtype the library reads: it was called 'a malformed entry in the header'."""
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"x.lora_down.weight": torch.zeros(4, 8, dtype=torch.complex64)}, str(path))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: tensor 'x.lora_down.weight' is complex64, which no "
                                        r"HunyuanVideo model or LoRA holds \(a foreign or damaged file\)$"):
        StateDictFile(path)


@pytest.mark.parametrize("header, data, encoding, reason", [
    ({"a": A, "b": {**B, "data_offsets": [8, 16]}}, DATA[:16], "utf-8", r"tensor 'b' starts at byte 8 of the data, where another tensor "
                                                                        r"overlaps it, up to byte 16"),
    ({"a": A, "b": B}, DATA + b"\0" * 8, "utf-8", r"8 bytes after its last tensor"),
    ({"a": {**A, "data_offsets": [8, 24]}}, DATA, "utf-8", r"tensor 'a' starts at byte 8 of the data, where the previous "
                                                           r"tensor ends at byte 0"),
    ({"a": A, "b": B}, DATA, "utf-16", r"header is not UTF-8 JSON"),
    ({"__metadata__": ["x"], "a": A, "b": B}, DATA, "utf-8", r"its __metadata__ must map text to text; it is list"),
    ({"__metadata__": {"ss_network_dim": 4}, "a": A, "b": B}, DATA, "utf-8",
     r"its __metadata__ must map text to text; its value for 'ss_network_dim' is int"),
    ({"a": {**A, "shape": [2.0, 2.0]}, "b": B}, DATA, "utf-8", r"tensor 'a' has a malformed entry in the header"),
    ({"a": A, "b": {**B, "data_offsets": [24, 16]}}, DATA, "utf-8", r"tensor 'b' has a malformed entry in the header"),
    (json.dumps({"__metadata__": {"ss_network_dim": "4"}, "a": A, "b": B})[:-1] + ', "__metadata__": {"x": "y"}}', DATA, "utf-8",
     r"its header names __metadata__ twice"),  # (json keeps the last: the training metadata of the first was lost)
], ids=["overlap", "bytes-after", "gap-at-start", "utf16", "metadata-list", "metadata-int", "fractional-shape", "end-before-begin",
        "metadata-twice"])
def test_a_safetensors_header_the_safetensors_library_refuses_is_refused_naming_the_file(tmp_path, header, data, encoding, reason):
    """What the safetensors library will not open (so no other tool loads it either) is refused with the file and the
    fault named, before any tensor is read: overlapping or loose tensor ranges, bytes past the last one, a header in
    UTF-16, metadata that is not text to text, fractional or overflowing dimensions. Read as it was, such a file was
    a traceback from torch (a stride that overflows, a list taken for a dict) or was accepted, its tensors read from
    the wrong bytes."""
    from safetensors import safe_open

    good = tmp_path / "good.safetensors"
    good.write_bytes(_safetensors_bytes({"a": A, "b": B}, DATA))
    assert sorted(StateDictFile(good).load_all()) == ["a", "b"]
    path = tmp_path / "lora.safetensors"
    path.write_bytes(_safetensors_bytes(header, data, encoding))
    with pytest.raises(Exception):  # the reference: the library that wrote the format refuses it too
        with safe_open(str(path), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: (not a safetensors file \()?{reason}"):
        StateDictFile(path)
    with pytest.raises(UserError, match=re.escape(str(path))):
        files.read_safetensors_header(path)


def test_a_header_over_the_readers_limit_is_said_to_be_so_not_to_be_too_long_for_its_file(tmp_path):
    """fuzz_aw 6: a header of 101 MB (huge metadata) was "header length N does not fit a M-byte file", which it does; the
    safetensors library refuses it for its size."""
    from safetensors import safe_open

    path = tmp_path / "big_metadata.safetensors"
    path.write_bytes(_safetensors_bytes({"__metadata__": {"big": "x" * (101 * 2**20)}, "a": A, "b": B}, DATA))
    with pytest.raises(Exception):
        safe_open(str(path), framework="pt")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: its header is [\d,]+ bytes, over the 100 MB that safetensors "
                                        r"readers accept \(metadata far too large\?\); save it again with less metadata$"):
        files.read_safetensors_header(path)


def test_metadata_is_written_as_the_safetensors_library_writes_it_utf8_text(tmp_path):
    """Escaped as JSON's ASCII, an emoji took 12 header bytes: a 36 MB --training_comment made a header past the 100 MB
    that library reads (fuzz_aa 12), and the file it had said "saved" opened nowhere else. A name's byte that is not
    UTF-8 is written as the text \\xNN (a lone surrogate's escape is refused by that library)."""
    from safetensors import safe_open

    from musubi_tuner.files import save_safetensors

    path = tmp_path / "x.safetensors"
    comment, name = "\U0001F600" * 1000 + " café", os.fsdecode(b"caf\xe9.png")
    save_safetensors({"a": torch.zeros(2)}, path, metadata={"ss_training_comment": comment, "source": name})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"ss_training_comment": comment, "source": "caf\\xe9.png"}
    assert int.from_bytes(path.read_bytes()[:8], "little") < 4 * 1000 + 200


def test_a_tensor_whose_dimensions_overflow_is_refused_naming_it(tmp_path):
    """No elements, but dimensions whose product passes 2**63: torch cannot give it strides ("Stride calculation
    overflowed", a traceback)."""
    path = tmp_path / "lora.safetensors"
    path.write_bytes(_safetensors_bytes({"a": A, "c": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [16, 16]}},
                                        DATA[:16]))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: tensor 'c' has a malformed entry in the header \(bytes "
                                        r"16\.\.16 for float32 \[0, 4611686018427387904, 4611686018427387904\]\)"):
        StateDictFile(path)


def test_an_output_that_is_a_link_has_its_target_written(tmp_path):
    """As `cp` and `>` do: replacing the link put the file beside it, on the link's disk, and the target kept its old
    contents."""
    (tmp_path / "disk").mkdir()
    target = tmp_path / "disk" / "merged.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "merged.safetensors"
    link.symlink_to(target)
    files.save_safetensors({"a": torch.ones(2)}, link)
    assert link.is_symlink() and files.StateDictFile(target).load_all()["a"].tolist() == [1.0, 1.0]
    dangling = tmp_path / "out.safetensors"
    dangling.symlink_to(tmp_path / "nowhere" / "out.safetensors")
    with pytest.raises(UserError, match=rf"^{re.escape(str(dangling))}: cannot write: it is a link to \S+nowhere/out\.safetensors, "
                                        r"whose folder does not exist"):
        files.save_safetensors({"a": torch.ones(2)}, dangling)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_only_process_0_of_several_makes_the_output_folders_so_the_one_that_reports_a_failure_removes_them(tmp_path, monkeypatch):
    """The process that made a run's output folder recorded it; when that one was killed, process 0 reported the failure
    and left the empty folder behind (1 run in 3)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    files.require_writable_folder(tmp_path / "out" / "sub", "--output_dir")
    assert not (tmp_path / "out").exists()  # probed at the nearest folder there, made by process 0
    monkeypatch.setenv("RANK", "0")
    files.require_writable_folder(tmp_path / "out" / "sub", "--output_dir")
    assert (tmp_path / "out" / "sub").is_dir()
    files.remove_created_empty_folders()  # as a failed command does
    assert not (tmp_path / "out").exists()


def test_a_size_just_past_the_limit_and_a_name_with_a_trailing_space_are_told_plainly(tmp_path):
    """'1 MiB, too large for a caption file (at most 1 MiB)' for 1,048,577 bytes; 'x.png : file not found' for a JSONL
    path with a trailing space (invisible in the message)."""
    caption = tmp_path / "x.txt"
    caption.write_bytes(b"a" * (2**20 + 1))
    with pytest.raises(UserError, match=r"x\.txt: 1,048,577 bytes, too large for a caption file \(at most 1 MiB\)$"):
        require_file(caption, "caption file", max_bytes=2**20)
    with pytest.raises(UserError, match=r"^'.*/x\.png ': image not found$"):
        require_file(tmp_path / "x.png ", "image")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"images\\x\.png: image not found \(with / for \\ it exists: write the path with /\)$"):
        require_file(f"{tmp_path}/images\\x.png", "image")  # (a JSONL written on Windows)


def test_a_limit_of_the_machine_is_named_as_such_not_blamed_on_the_file(tmp_path):
    """Out of file descriptors (ulimit -n) while torch loaded the VAE, the VAE was "truncated or a different format";
    videos the decoder had no threads for were each "not a readable video" and skipped, and the run ended well."""
    import errno
    import resource

    from musubi_tuner.errors import MachineLimit, limit_met

    path = tmp_path / "vae.pt"
    path.write_bytes(b"x")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # the next descriptor is past the limit
    try:
        with pytest.raises(OSError) as met:
            open(path, "rb")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert met.value.errno == errno.EMFILE
    limit = limit_met(path, met.value)
    assert isinstance(limit, MachineLimit) and str(limit) == (
        f"{path}: cannot be read now (Too many open files): a limit of this process or machine (memory, threads or open "
        "files: ulimit -v, -u, -n), not the file")
    assert limit_met(path, FileNotFoundError(errno.ENOENT, "No such file or directory")) is None  # the file's own: not a limit


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_tensor_got_from_a_mapped_file_is_its_own_so_a_rewrite_of_the_file_cannot_change_a_model(tmp_path, suffix, monkeypatch):
    """Training on the CPU built the DiT on the file's own pages (a bf16 file read as bf16: no cast, no move, and
    load_state_dict(assign=True)): rewriting the file mid-run killed it with SIGBUS, or changed its frozen weights, and
    the NaN that followed was blamed on the learning rate."""
    from safetensors.torch import save_file

    monkeypatch.setattr(files, "MAPPED_FROM_BYTES", 2**16)  # (safetensors files from 512 MiB are mapped: a DiT's size)
    path = tmp_path / f"dit{suffix}"
    weights = {"w": torch.zeros(2**16, dtype=torch.bfloat16)}  # 128 KiB: mapped (a .pt in the zip format always is)
    torch.save(weights, path) if suffix == ".pt" else save_file(weights, str(path))
    t = StateDictFile(path).get("w", dtype=torch.bfloat16, device="cpu")
    with open(path, "r+b") as f:  # rewritten in place, as `cp other.pt dit.pt` does
        f.seek(path.stat().st_size // 2)
        f.write(b"\x7f" * 4096)
    assert not t.any()


def test_a_folder_replaced_by_a_file_during_a_write_is_the_writes_one_line_error_not_the_clean_ups(tmp_path):
    """fuzz_aq 8: the clean-up's own failure (the temporary file could not be removed from a folder now read-only or
    replaced) was raised instead of the write's error, so every caller's handling of a failed write (the final LoRA's
    rescue, a sample grid's warning) was skipped."""
    from musubi_tuner.files import atomic_write

    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        with atomic_write(out / "x.safetensors") as tmp:
            tmp.write_bytes(b"finished")
            shutil.rmtree(out)
            out.write_text("a file where the folder was")
    assert str(e.value) == f"{out / 'x.safetensors'}: cannot write: {out} is a file, not a folder"


def test_a_folder_moved_while_a_file_is_written_into_it_gets_the_finished_file_under_its_name(tmp_path):
    """fuzz_aq 4: the finished file (a video, a merged DiT) stayed in the moved folder as a hidden temporary file, which
    the next run there deleted as an interrupted run's."""
    from musubi_tuner.files import atomic_write

    out, moved = tmp_path / "out", tmp_path / "moved"
    with pytest.raises(UserError) as e:
        with atomic_write(out / "x.mp4") as tmp:
            tmp.write_bytes(b"finished")
            out.rename(moved)
    assert str(e.value) == f"{out / 'x.mp4'}: its folder was moved to {moved} while this was written; the file is saved there, as {moved / 'x.mp4'}"
    assert [p.name for p in moved.iterdir()] == ["x.mp4"] and (moved / "x.mp4").read_bytes() == b"finished"
    with pytest.raises(UserError, match="its folder is gone"):  # deleted: nothing to keep
        with atomic_write(out / "y.mp4") as tmp:
            tmp.write_bytes(b"lost")
            shutil.rmtree(out)


def test_what_stands_where_a_folder_must_be_is_named_as_what_it_is(tmp_path):
    """fuzz_as 3: a FIFO (or a device) where an output folder must be was "a file", a link loop "a broken symbolic link"."""
    from musubi_tuner.files import require_writable_folder

    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for name, said in (("fifo", "a FIFO"), ("loop", "a symbolic link loop")):
        with pytest.raises(UserError) as e:
            require_writable_folder(tmp_path / name / "out", "--output_dir")
        assert str(e.value).startswith(f"{tmp_path / name}: is {said}, not a folder"), str(e.value)


def test_folders_the_user_may_not_list_are_named_as_such_by_every_reader():
    """fuzz_as 2: a text encoder folder, a --video_path folder of frames and a --resume state folder that the user may
    not list were a bare "Permission denied" naming a file inside them (one that did not exist)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run as another user (root lists any folder)")
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
    try:
        os.chown(folder, 54321, 54321)  # (its folder theirs; the one inside root's, which they may not list)
        locked = folder / "locked"
        locked.mkdir(mode=0o000)
        code = ("import sys\nfrom musubi_tuner.errors import UserError\n"
                "from musubi_tuner.hunyuan.text_encoders import check_text_encoder1\n"
                "from musubi_tuner.data.media import load_video\nfrom musubi_tuner.training.state import read_marker\n"
                "for call in (check_text_encoder1, load_video, read_marker):\n"
                "    try:\n        call(sys.argv[1])\n    except Exception as e:\n        print(type(e).__name__, e)\n")
        done = subprocess.run([sys.executable, "-c", code, str(locked)], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                              user=54321, group=54321, extra_groups=[], capture_output=True, text=True, timeout=120)
        lines = done.stdout.splitlines()
        assert len(lines) == 3 and all("cannot list this" in line and "(Permission denied)" in line for line in lines), done.stdout + done.stderr[-2000:]
    finally:
        os.chmod(folder / "locked", 0o700)
        shutil.rmtree(folder)


def test_a_file_named_alike_but_for_case_or_unicode_form_is_pointed_to(tmp_path):
    """fuzz_bc 9: a JSONL image_path or --image_path typed in NFC, of a file named in NFD (as macOS names them), or in another
    case, was "file not found" of a name that looks the same as the one ls shows."""
    import unicodedata

    nfd = unicodedata.normalize("NFD", "café.png")
    (tmp_path / nfd).write_bytes(b"x")
    (tmp_path / "Photo.PNG").write_bytes(b"x")
    for typed, there in ((unicodedata.normalize("NFC", "café.png"), nfd), ("photo.png", "Photo.PNG")):
        with pytest.raises(UserError) as info:
            require_file(tmp_path / typed, "image", "--image_path")
        assert str(info.value) == (f"{tmp_path / typed}: image not found ({there!r} is there, a name that differs only in case "
                                   "or Unicode form) (--image_path)")
    with pytest.raises(UserError, match=r"other\.png: image not found \(--image_path\)$"):
        require_file(tmp_path / "other.png", "image", "--image_path")
