"""Context parallel (Ulysses): N processes sharing each sample's tokens compute what one process computes.

One launch of 4 processes (gloo, forked from the test) runs every case against the single-process result:
N = 4; N = 2 inside data parallel 2 x context parallel 2, with checkpointing and split attention; generation
with N = 4, and real CFG over two groups of 2 (CFG-parallel) with a step cache; the VAE decode with its tiles
shared out over the processes. The tiny DiT has 4 heads, an odd number of image tokens (45: every N pads)
and a batch of prompts of different lengths (5 and 13).
"""

import pytest
import torch
import torch.distributed as dist

from helpers import dit_inputs, rel_err, run_group
from musubi_tuner.demo.tiny_dit import random_dit_state_dict, tiny_dit_config
from musubi_tuner.demo.tiny_vae import TINY_VAE, random_vae_state_dict
from musubi_tuner.distributed import CfgBranches, GradientReducer, WorkShare, logging_collectives, make_layout
from musubi_tuner.errors import UserError
from musubi_tuner.hunyuan.dit import HunyuanVideoDiT
from musubi_tuner.hunyuan.sequence_parallel import SequenceParallel, check_heads
from musubi_tuner.hunyuan.vae import CausalVideoVAE
from musubi_tuner.inference.sampler import Guidance, denoise, sigma_schedule
from musubi_tuner.inference.step_cache import StepCache
from musubi_tuner.networks import lora
from musubi_tuner.planning import MemoryOptions, Workload
from musubi_tuner.planning.planner import collective_bytes

CONFIG = tiny_dit_config(heads_num=4)
TOL = 1e-5


def build():
    dit = HunyuanVideoDiT(CONFIG)
    dit.load_state_dict(random_dit_state_dict(CONFIG, seed=3, scale=0.08))
    net = lora.create_arch_network(1.0, 4, 4, None, None, dit, include_patterns="[r'.*_mod.*', r'.*modulation.*']")
    net.apply_to(None, dit)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:  # a trained LoRA: every LoRA weight gets a gradient
                p.normal_(0.0, 0.05)
    return dit.eval(), net


INPUTS = dit_inputs(CONFIG, batch=2, frames=3, height=6, width=10, text_lens=(5, 13))
WEIGHT = torch.randn(2, CONFIG.out_channels, 3, 6, 10, generator=torch.Generator().manual_seed(7))


def forward_backward(dit, net, samples: slice) -> dict:
    """The prediction and the gradients of mean over samples of sum(pred * WEIGHT)."""
    net.zero_grad(set_to_none=True)
    x, t, text, mask, pooled, g = (v[samples].clone() for v in INPUTS)
    x.requires_grad_()
    text.requires_grad_()
    out = dit(x, t, text, mask, pooled, g)
    (out * WEIGHT[samples]).sum(dim=(1, 2, 3, 4)).mean().backward()
    return {"out": out.detach(), "x": x.grad, "text": text.grad, **{n: p.grad for n, p in net.named_parameters()}}


def sample(dit, cfg_scale: float, branches=None, cache=None, split=False) -> torch.Tensor:
    x, _, text, mask, pooled, _ = INPUTS
    cond = {"text_states": text[1:], "text_mask": mask[1:], "text_states_2": pooled[1:]}
    uncond = {"text_states": text[:1], "text_mask": mask[:1], "text_states_2": pooled[:1]}
    guidance = Guidance(embedded_scale=6.0, scale=cfg_scale, branches=branches, split=split)
    with torch.no_grad():
        return denoise(dit, x[:1], sigma_schedule(4, 7.0), cond=cond, uncond=uncond if cfg_scale != 1 else None, guidance=guidance,
                       step_cache=cache)


def tiled_vae():
    vae = CausalVideoVAE(TINY_VAE)
    vae.load_state_dict(random_vae_state_dict(TINY_VAE, seed=0))
    vae.set_memory_options(tiling=True, spatial_tile_sample_min_size=32)  # a 4 x 6 latent: 2 x 2 tiles
    return vae.eval()


LATENT = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))


def worker(rank: int, world: int, dit, net, vae) -> dict:
    results = {}
    vae.tile_share = WorkShare()
    with torch.no_grad():
        results["decoded"] = vae.decode(LATENT)
    # N = world: every process holds a quarter of each sample's tokens
    whole = make_layout(world)
    dit.sequence_parallel = whole.sequence
    got = forward_backward(dit, net, slice(None))
    for key in ("x", "text"):  # computed whole on every process, each holding its tokens' part of the gradient
        dist.all_reduce(got[key])
    GradientReducer(list(net.parameters()), divide_by=whole.replicas).reduce()
    results["cp4"] = got | {n: p.grad for n, p in net.named_parameters()}
    with logging_collectives() as log:
        results["cp4_latents"] = sample(dit, 1.0)
    results["cp4_sent"] = torch.tensor([log.bytes_sent(), log.count("all_to_all"), log.count("all_gather"), log.count()])

    # data parallel 2 x context parallel 2: replica r trains on sample r, with checkpointing and split attention
    pairs = make_layout(2)
    dit.sequence_parallel = pairs.sequence
    dit.set_attention("sdpa", split=True)
    dit.enable_gradient_checkpointing()
    dit.train()
    got = forward_backward(dit, net, slice(pairs.replica, pairs.replica + 1))
    for key in ("x", "text"):
        dist.all_reduce(got[key], group=pairs.sequence.group)
    with logging_collectives() as log:
        GradientReducer(list(net.parameters()), divide_by=pairs.replicas).reduce()
    results["dp2cp2"] = got | {"all_reduces": log.count()} | {n: p.grad for n, p in net.named_parameters()}
    dit.eval()
    dit.disable_gradient_checkpointing()
    dit.set_attention("sdpa", split=False)

    # generation: real CFG with the negative prompt on one pair and the positive on the other, step cache on
    cache = StepCache("teacache", 0.3)
    results["cfg_latents"] = sample(dit, 5.0, CfgBranches.of(pairs), cache)
    results["cfg_skipped"] = torch.tensor([d.skipped for d in cache.decisions])
    return results


@pytest.fixture(scope="module")
def reference():
    dit, net = build()
    ref = forward_backward(dit, net, slice(None))
    cache = StepCache("teacache", 0.3)
    ref_cfg = sample(dit, 5.0, cache=cache, split=True)  # each prompt's cache decides alone, as on its own process
    return dit, net, ref, sample(dit, 1.0), ref_cfg, [d.skipped for d in cache.decisions]


def test_four_processes_and_two_by_two_compute_what_one_process_computes(reference):
    dit, net, ref, ref_latents, ref_cfg, ref_skipped = reference
    vae = tiled_vae()
    with torch.no_grad():
        decoded = vae.decode(LATENT)
    results = run_group(4, worker, dit, net, vae)
    for rank, res in enumerate(results):
        # each process decoded one of the 4 tiles and every one got all (not bit for bit: 1 thread here, 2 in the test)
        assert res["decoded"].shape == decoded.shape and rel_err(res["decoded"], decoded) < TOL
        got = res["cp4"]
        assert got.keys() == ref.keys()
        for key in ref:
            assert rel_err(got[key], ref[key]) < TOL, (rank, "N=4", key, rel_err(got[key], ref[key]))
        assert rel_err(res["cp4_latents"], ref_latents) < TOL
        # what the processes sent while sampling is what the planner predicts: 4 steps of one DiT call each,
        # two all-to-alls in each of the 4 blocks' attention and one gather of the prediction
        planned = collective_bytes(Workload(CONFIG, 48, 80, 9, text_tokens=13, mode="generate"),
                                   MemoryOptions(mixed_precision="no", context_parallel=4))
        assert res["cp4_sent"].tolist() == [4 * planned, 4 * 4 * 2, 4, 4 * 4 * 2 + 4]

        # replica r's prediction is sample r's; the LoRA gradients are averaged over the replicas as over a batch
        r = rank // 2
        got = res["dp2cp2"]
        assert rel_err(got["out"], ref["out"][r : r + 1]) < TOL
        for key in ("x", "text"):  # sample r's input gradients (its loss alone: twice its share of the batch's mean)
            assert rel_err(got[key], 2 * ref[key][r : r + 1]) < TOL, (rank, "N=2", key, rel_err(got[key], 2 * ref[key][r : r + 1]))
        for key in ref:
            if key.startswith("lora_"):
                assert rel_err(got[key], ref[key]) < TOL, (rank, "2x2", key, rel_err(got[key], ref[key]))
        assert got["all_reduces"] == 1 and len(list(net.parameters())) == 52  # 52 LoRA tensors, one collective

        assert rel_err(res["cfg_latents"], ref_cfg) < TOL
        assert res["cfg_skipped"].tolist() == ref_skipped[r::2]  # the negative prompt's decisions, then the positive's
    assert any(ref_skipped) and not all(ref_skipped)  # the cache decided both ways: the global metric was exercised


def test_a_head_count_that_does_not_split_is_refused_with_the_counts_that_do():
    check_heads(24, 8)
    with pytest.raises(UserError, match=r"--context_parallel 5: the DiT's 24 attention heads .* use one of 1, 2, 3, 4, 6, 8, 12, 24"):
        check_heads(24, 5)


def test_shards_cover_the_sequence_once_with_padding_at_the_end():
    sp = [SequenceParallel(None, 4, r).shard(45, 13) for r in range(4)]
    tokens = torch.arange(45.0).view(1, 45, 1)
    parts = [s.image(tokens) for s in sp]
    assert [p.shape[1] for p in parts] == [12] * 4 and [s.valid_image_rows for s in sp] == [12, 12, 12, 9]
    assert torch.equal(torch.cat(parts, dim=1)[0, :45, 0], torch.arange(45.0))
    # the attention order puts every real token first: [image, text, image padding, text padding]
    joint = torch.cat([torch.cat([p, s.text(100 + torch.arange(13.0).view(1, 13, 1))], 1) for p, s in zip(parts, sp)], 1)
    canonical = sp[0]._canonical(joint.unsqueeze(-1))[0, :, 0, 0]
    assert canonical[:58].tolist() == list(range(45)) + [100 + i for i in range(13)]
    assert torch.equal(sp[0]._uncanonical(sp[0]._canonical(joint.unsqueeze(-1))), joint.unsqueeze(-1))
