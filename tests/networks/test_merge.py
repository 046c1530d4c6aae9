"""merge_lora.py: the merged DiT equals the base with the LoRAs applied on the fly."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import dit_inputs, rel_err
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config, write_dit
from musubi_tuner.errors import UserError
from musubi_tuner.files import read_safetensors_header
from musubi_tuner.hunyuan.checkpoints import load_dit
from musubi_tuner.networks import lora
from musubi_tuner.networks.lora_files import load_lora
from musubi_tuner.networks.merge import merge_file, merge_loras_into, resolve_multipliers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    config = tiny_dit_config()
    dit = write_dit(tmp / "dit.pt", random_dit_state_dict(config, seed=5, scale=0.05), config, "pt")
    paths = []
    for seed, rank in ((1, 4), (2, 8)):
        model = load_dit(dit, dtype=torch.float32)
        net = lora.create_arch_network(1.0, rank, rank / 2, None, None, model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in net.unet_loras:
                m.lora_up.weight.normal_(0, 0.05, generator=g)
        path = tmp / f"lora{seed}.safetensors"
        net.save_weights(str(path), torch.float32, {})
        paths.append(path)
    return tmp, config, dit, paths


def on_the_fly(dit, config, paths, multipliers, args):
    model = load_dit(dit, dtype=torch.float32)
    for path, m in zip(paths, multipliers):
        net = lora.create_arch_network_from_weights(m, load_lora(path), model)
        net.apply_to(None, model)
    with torch.no_grad():
        return model(*args)


def test_merged_file_equals_loras_applied_on_the_fly(setup):
    tmp, config, dit, paths = setup
    args = dit_inputs(config, batch=1, text_lens=(6,))
    out = merge_file(str(dit), [str(p) for p in paths], [0.8, -0.5], str(tmp / "merged.safetensors"))
    assert out["layers"] == 20  # 2 double blocks x 8 + 2 single blocks x 2, both LoRAs on the same layers
    merged = load_dit(tmp / "merged.safetensors", dtype=torch.float32)
    with torch.no_grad():
        got = merged(*args)
    want = on_the_fly(dit, config, paths, [0.8, -0.5], args)
    base = load_dit(dit, dtype=torch.float32)(*args).detach()
    assert rel_err(got, want) < 2e-2  # the merged weights are rounded to the file's bf16
    assert rel_err(got, want) < rel_err(base, want) / 5


def test_an_alpha_of_zero_acts_as_the_rank_in_every_path(setup, tmp_path):
    """musubi-tuner's and kohya's LoRA modules read alpha 0 as the rank; merging, the on-the-fly path and the
    inspection agree (merging applied such a file at strength 0 while the fp8 path, via the modules, applied it whole)."""
    from safetensors.torch import load_file, save_file

    from musubi_tuner.networks.lora_inspect import inspect_lora

    tmp, config, dit, paths = setup
    weights = load_file(paths[0])
    zero = {k: (torch.zeros_like(v) if k.endswith(".alpha") else v) for k, v in weights.items()}
    ranked = {k: (torch.full_like(v, 4.0) if k.endswith(".alpha") else v) for k, v in weights.items()}  # rank 4
    save_file(zero, tmp_path / "zero.safetensors")
    save_file(ranked, tmp_path / "ranked.safetensors")
    args = dit_inputs(config, batch=1, text_lens=(6,))
    outs = []
    for name in ("zero", "ranked"):
        merge_file(str(dit), [str(tmp_path / f"{name}.safetensors")], [1.0], str(tmp_path / f"m_{name}.safetensors"))
        with torch.no_grad():
            outs.append(load_dit(tmp_path / f"m_{name}.safetensors", dtype=torch.float32)(*args))
    fly = on_the_fly(dit, config, [tmp_path / "zero.safetensors"], [1.0], args)
    assert torch.equal(outs[0], outs[1]) and rel_err(fly, outs[1]) < 2e-2
    norms = {name: sum(m.norm for m in inspect_lora(tmp_path / f"{name}.safetensors").modules) for name in ("zero", "ranked")}
    assert norms["zero"] == norms["ranked"] > 0


def test_merged_keys_equal_the_base_and_dtype_is_kept(setup):
    tmp, config, dit, paths = setup
    out = tmp / "m2.safetensors"
    merge_file(str(dit), [str(paths[0])], None, str(out))
    entries, meta = read_safetensors_header(out)
    base = load_dit(dit).state_dict()
    assert list(entries) == list(base) and all(entries[k][0] == torch.bfloat16 for k in entries)


def test_in_memory_merge_in_float32_matches_on_the_fly_closely(setup):
    tmp, config, dit, paths = setup
    args = dit_inputs(config, batch=1, text_lens=(6,))
    model = load_dit(dit, dtype=torch.float32)
    merge_loras_into(model, [str(p) for p in paths], [1.0, 0.3])
    with torch.no_grad():
        got = model(*args)
    assert rel_err(got, on_the_fly(dit, config, paths, [1.0, 0.3], args)) < 1e-5


def test_multiplier_counts_are_read_as_musubi_tuner_reads_them(caplog):
    """fuzz_ad F2: one value was applied to every file; musubi-tuner applies the i-th value to the i-th file and 1.0 to
    the files after the last value, so its command merged otherwise here, unsaid."""
    assert resolve_multipliers(["a", "b"], None) == [1.0, 1.0]
    with caplog.at_level(logging.WARNING):
        assert resolve_multipliers(["a", "b", "c"], [0.5]) == [0.5]  + [1.0, 1.0]
        assert resolve_multipliers(["a", "b"], [1, 2, 3]) == [1, 2]
    assert caplog.text == ""  # (said by the checks before the work only)
    with caplog.at_level(logging.WARNING):
        resolve_multipliers(["a.pt", "b.pt", "c.pt"], [0.5], say=True)
        resolve_multipliers(["a", "b"], [1, 2, 3], say=True)
    assert ("--lora_multiplier gives 1 value(s) for 3 files: b.pt, c.pt are applied at 1.0, as musubi-tuner "
            "reads the flag (give one value per file)") in caplog.text
    assert "--lora_multiplier gives 3 values for 2 file(s): the last 1 unused" in caplog.text


def test_lora_of_another_model_size_is_named(setup, tmp_path):
    tmp, config, dit, paths = setup
    bigger = tiny_dit_config(hidden_size=128, heads_num=4, mlp_hidden_size=512)
    big_dit = write_dit(tmp_path / "big.safetensors", random_dit_state_dict(bigger), bigger)
    with pytest.raises(UserError, match=r"lora1\.safetensors: double_blocks\.0\.img_attn_qkv is \[192, 64\] in the LoRA but "
                                        r"\[384, 128\] in \S+big\.safetensors \(a LoRA for another model size\?\)"):
        merge_file(str(big_dit), [str(paths[0])], None, str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


def test_command_line_as_the_seed_types_it(setup, tmp_path):
    tmp, config, dit, paths = setup
    out = tmp_path / "merged.safetensors"
    cmd = [sys.executable, "src/musubi_tuner/merge_lora.py", "--dit", str(dit), "--lora_weight", str(paths[0]),
           "--save_merged_model", str(out), "--device", "cpu", "--lora_multiplier", "1.0"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "merged 1 LoRA file(s)" in result.stdout
    more = subprocess.run(cmd[:-2] + ["--lora_multiplier", "1", "2"], cwd=ROOT, capture_output=True, text=True)
    assert more.returncode == 0 and "--lora_multiplier gives 2 values for 1 file(s): the last 1 unused" in more.stderr


def test_lora_blocks_choose_the_blocks_each_lora_is_merged_into(setup, tmp_path):
    tmp, config, dit, paths = setup
    base = load_dit(dit, dtype=torch.float32).state_dict()

    def changed(lora_blocks):
        model = load_dit(dit, dtype=torch.float32)
        merge_loras_into(model, [str(p) for p in paths], [1.0, 1.0], lora_blocks=lora_blocks)
        return sorted({k.rsplit(".", 1)[0] for k, v in model.state_dict().items() if not torch.equal(v, base[k])})

    everything = changed(None)
    assert len(everything) == 20 and changed("all") == everything
    assert all(p.startswith("double_blocks.") for p in changed("double")) and len(changed("double")) == 16
    # one value per file: the first LoRA on single block 1 only, the second on the image attention layers only
    assert changed([r"single_blocks\.1\.", "img_attn"]) == [
        "double_blocks.0.img_attn_proj", "double_blocks.0.img_attn_qkv", "double_blocks.1.img_attn_proj", "double_blocks.1.img_attn_qkv",
        "single_blocks.1.linear1", "single_blocks.1.linear2"]
    with pytest.raises(UserError, match="--lora_blocks '\\(': not 'all', 'double', 'single' or a valid regular expression"):
        changed("(")
    with pytest.raises(UserError, match="2 LoRA files but 3 values of --lora_blocks"):
        changed(["all", "all", "all"])


def test_lora_blocks_filter_the_on_the_fly_path_the_same_way(setup):
    from musubi_tuner.inference.pipeline import apply_loras_on_the_fly

    tmp, config, dit, paths = setup
    args = dit_inputs(config, batch=1, text_lens=(6,))
    merged = load_dit(dit, dtype=torch.float32)
    merge_loras_into(merged, [str(paths[0])], [0.7], lora_blocks="single")
    beside = load_dit(dit, dtype=torch.float32)
    apply_loras_on_the_fly(beside, [str(paths[0])], [0.7], False, ["single"])
    with torch.no_grad():
        assert rel_err(beside(*args), merged(*args)) < 1e-5


def test_merge_lora_command_takes_lora_blocks(setup, tmp_path):
    tmp, config, dit, paths = setup
    out = tmp_path / "double_only.safetensors"
    r = subprocess.run([sys.executable, "src/musubi_tuner/merge_lora.py", "--dit", str(dit), "--lora_weight", str(paths[0]),
                        "--save_merged_model", str(out), "--device", "cpu", "--lora_blocks", "double"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "into 16 layers" in r.stdout


MEMORY_PROBE = """
import sys
from musubi_tuner.networks.merge import merge_file

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current resident set
base = status("VmRSS")
merge_file(sys.argv[1], [sys.argv[2]], [1.0], sys.argv[3])
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_merging_a_file_needs_less_memory_than_one_copy_of_the_model(tmp_path):
    """Streaming: neither the model nor full-size deltas are ever held whole (bench/merge.py measures a bigger one)."""
    import os

    config = tiny_dit_config(hidden_size=512, heads_num=4, mlp_hidden_size=2048, mm_double_blocks_depth=1, mm_single_blocks_depth=4)
    dit = write_dit(tmp_path / "dit.safetensors", random_dit_state_dict(config, seed=0), config)
    model = load_dit(dit, dtype=torch.float32)
    net = lora.create_arch_network(1.0, 8, 8, None, None, model)
    net.save_weights(str(tmp_path / "lora.safetensors"), torch.float32, {})
    del model, net
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}  # freed tensors leave the RSS
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(dit), str(tmp_path / "lora.safetensors"), str(tmp_path / "out.safetensors")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    one_copy = dit.stat().st_size
    assert one_copy > 40e6
    assert int(r.stdout.split()[-1]) < 0.6 * one_copy, (int(r.stdout.split()[-1]) / one_copy)


def documented_commands(doc: Path) -> list[list[str]]:
    """The command lines of the block marked `<!-- tested-commands -->` in a docs page, split like a shell would."""
    import shlex

    text = doc.read_text()
    block = text.split("<!-- tested-commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def test_the_commands_of_docs_merge_lora_run_on_the_demo_files(setup, tmp_path, capsys):
    """docs/merge_lora.md's example block, on a tiny DiT and LoRA where `python -m musubi_tuner.demo` puts them."""
    import importlib

    _, config, dit, paths = setup
    demo = tmp_path / "demo_output"
    (demo / "ckpts/hunyuan-video-t2v-720p/transformers").mkdir(parents=True)
    (demo / "output").mkdir()
    write_dit(demo / "ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt", load_dit(dit, dtype=torch.float32).state_dict(), config, "pt")
    (demo / "output/demo-lora.safetensors").write_bytes(paths[0].read_bytes())
    commands = documented_commands(ROOT / "docs" / "merge_lora.md")
    assert len(commands) == 5
    for cmd in commands:
        cmd = [c.replace("demo_output/", f"{demo}/") for c in cmd]
        assert cmd[0] == "python"
        module = cmd[2] if cmd[1] == "-m" else "musubi_tuner." + Path(cmd[1]).stem  # run in this process: faster
        importlib.import_module(module).main(cmd[3:] if cmd[1] == "-m" else cmd[2:])
    out = capsys.readouterr().out
    assert "into 16 layers" in out and "20 modules in the other naming" in out and "20 modules in the default naming" in out
    assert (demo / "merged.safetensors").is_file() and (demo / "merged_double.safetensors").is_file()
    # the round trip through the other naming gives the same update (up @ down * alpha / rank) per module
    a, b = load_lora(demo / "output/demo-lora.safetensors"), load_lora(demo / "demo-lora-back.safetensors")
    for name in (k.removesuffix(".lora_down.weight") for k in a if k.endswith(".lora_down.weight")):
        def delta(w):
            return w[f"{name}.lora_up.weight"] @ w[f"{name}.lora_down.weight"] * (w[f"{name}.alpha"] / w[f"{name}.lora_down.weight"].shape[0])
        assert torch.allclose(delta(a), delta(b), atol=1e-6)
