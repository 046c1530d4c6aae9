"""Know before you run: GPU and host memory per stage, FLOPs and time per step, from the model's real shapes.

    from musubi_tuner.planning import Workload, MemoryOptions, plan, fit_budget, gpu
    p = plan(Workload(HUNYUAN_T2V, 544, 960, 129, mode="train"), MemoryOptions(fp8=True, gradient_checkpointing=True), gpu("rtx4090"))

Memory comes from running the real modules without memory or arithmetic: the DiT's step traced on fake tensors
(dit_trace, tracer: PyTorch's MemTracker), the text encoders' forward traced the same way (encoders), the VAE's
encode and decode on meta tensors (vae, measure); the tests check each against real CPU runs of the same code.
"""

from musubi_tuner.planning.options import MemoryOptions, Workload
from musubi_tuner.planning.planner import Plan, Search, Stage, fit_budget, plan
from musubi_tuner.planning.timing import GPUS, gpu

__all__ = ["GPUS", "MemoryOptions", "Plan", "Search", "Stage", "Workload", "fit_budget", "gpu", "plan"]
