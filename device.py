"""
Where and how a process runs, for every script that computes with the model: the device and dtype
("auto" resolved), torch.compile's choice, torchrun's process group (set up, shared values, torn down),
DDP and FSDP2 wrapping, the allocator setting on CPU, peak memory, and the provenance a run records
(its command line and the kit's git commit). Nothing here knows about training loops or checkpoints.
"""
import contextlib
import ctypes
import importlib.util
import inspect
import os
import shlex
import subprocess
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


class Run(NamedTuple):
    """Where this process runs and how: what setup_device() resolved."""
    ddp: bool               # launched by torchrun: one of world_size processes
    rank: int
    local_rank: int
    world_size: int
    master: bool            # rank 0: evaluates, logs and saves
    device: str             # "cpu", "cuda:0", "mps"
    device_type: str        # "cpu", "cuda", "mps"
    dtype: str              # "float32", "bfloat16", "float16"
    compile: bool
    autocast: object        # the context every forward pass runs in


PTDTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device, dtype, cpu_bf16=False):
    """(device, dtype) with "auto" resolved: cuda, then mps, then cpu; bfloat16 where the GPU supports it,
    float16 on older GPUs; with cpu_bf16, bfloat16 on CPUs with bf16 instructions (auto_dtype); float32 elsewhere."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = device.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps") or device.count(":") > 1 or \
            (":" in device and not (device_type == "cuda" and device.split(":")[1].isdigit())):
        raise SystemExit(f"error: --device={device} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={device} but no CUDA GPU is visible; use --device=cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device=mps but this machine has no Apple GPU; use --device=cpu")
    if dtype == "auto":
        dtype = auto_dtype(device_type, gpu_facts(device)[0] if device_type == "cuda" else None,
                           cpu_bf16 and device_type == "cpu" and cpu_has_bf16())
    if dtype not in PTDTYPE:
        raise SystemExit(f"error: --dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return device, dtype


def gpu_facts(device):
    """(compute capability, whether Triton is installed) of a CUDA device: what the automatic choices need."""
    return torch.cuda.get_device_capability(device), importlib.util.find_spec("triton") is not None


def auto_dtype(device_type, capability, cpu_bf16=False):
    """
    bfloat16 on GPUs that compute it natively (compute capability 8.0+: A100, RTX 30/40, H100); float16 with a
    GradScaler on older ones (T4, V100), where bf16 is emulated: no tensor cores, no flash attention, no Inductor.
    On CPU, bf16 autocast where the CPU computes bf16 and the stage asks for it (cpu_bf16: pretraining, faster at
    the same loss; SFT's small batches were slower: docs/experiments.md); float32 elsewhere, and for the
    decoders, whose greedy answers then match the exports'.
    """
    if device_type == "cuda":
        return "bfloat16" if capability >= (8, 0) else "float16"
    return "bfloat16" if device_type == "cpu" and cpu_bf16 else "float32"


def cpu_has_bf16():
    """Whether this CPU has bf16 instructions (x86 AVX-512 BF16 or AMX), as PyTorch's oneDNN sees them."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def auto_compile(device_type, capability, has_triton):
    """(compile or not, why not): on GPUs it needs Triton (not in PyTorch's Windows wheels) and compute capability
    7.0+; off on CPU, where it was measured not to help (docs/benchmarks.md)."""
    if device_type != "cuda":
        return False, None
    if not has_triton:
        return False, "Triton is not installed (PyTorch's Windows wheels have none)"
    if capability < (7, 0):
        return False, f"this GPU's compute capability {capability[0]}.{capability[1]} is below Triton's 7.0"
    return True, None


def setup_device(device, dtype, compile, keep_memory=True, cpu_bf16=False):
    """A Run: "auto" resolved, torch.distributed started under torchrun. On CPU, keep_memory: keep_freed_memory;
    cpu_bf16: dtype=auto may pick bf16 autocast (auto_dtype)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device, dtype = resolve_device(device, dtype, cpu_bf16)
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    elif device.startswith("cuda:"):
        torch.cuda.set_device(device)  # else kernels and caches that use "the current device" land on GPU 0
    device_type = device.split(":")[0]
    if dtype == "float16" and device_type != "cuda":
        raise SystemExit("error: float16 training needs a CUDA GPU (use bfloat16 or float32)")
    if device_type == "cuda":
        facts = gpu_facts(device)
        wanted, why_not = auto_compile(device_type, *facts)
        if compile is None:
            compile = wanted
            if why_not and rank == 0:
                print(f"torch.compile is off: {why_not}")
        elif compile and why_not:
            raise SystemExit(f"error: --compile=True cannot work here: {why_not}; use --compile=False")
        if dtype == "bfloat16" and facts[0] < (8, 0) and rank == 0:
            print(f"warning: this GPU (compute capability {facts[0][0]}.{facts[0][1]}) emulates bfloat16 slowly; "
                  f"--dtype=float16 (or auto) is much faster")
    elif compile is None:
        compile = False
    if device_type == "cpu" and keep_memory:
        keep_freed_memory()
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = contextlib.nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type,
                                                                                   dtype=PTDTYPE[dtype])
    return Run(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, master=rank == 0, device=device,
               device_type=device_type, dtype=dtype, compile=compile, autocast=autocast)


def run_main(main):
    """A training script's entry point. Under torchrun every process meets the same refusal (a SystemExit
    with a message): rank 0 prints it, the others exit with the same status without repeating it."""
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str) and int(os.environ.get("RANK", 0)) != 0:
            raise SystemExit(1)
        raise


def end_distributed(run, finished):
    """Leave the process group. After a normal end every process first waits for the others: one that
    tore its gloo connections down while rank 0 was still evaluating was seen to abort at exit."""
    if not run.ddp:
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def wrap_ddp(model, run):
    """The model under DDP, its buffers (the constant rope tables) never synced: `forward_sync_buffers=False` where
    torch has it (2.13+, where `broadcast_buffers` warns as deprecated), `broadcast_buffers=False` before."""
    device_ids = [run.local_rank] if run.device_type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, device_ids=device_ids, forward_sync_buffers=False)
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)


def wrap_fsdp(model, run):
    """
    The model under FSDP2 (fully_shard): each block, then the rest, sharded over the processes, one block's
    weights gathered at a time, computed in the run's dtype, gradients reduced in fp32. The device mesh is
    explicit (a gloo run on a GPU machine would pick CUDA). Rank 0's weights then go to every process tensor by
    tensor, each keeping its shard: the others may hold the model on the meta device only (model_to_tune's
    on_rank0), and every process starts from exactly rank 0's model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(run.device_type, (run.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=PTDTYPE[run.dtype], reduce_dtype=torch.float32)
    on_meta = model.tok_embeddings.weight.is_meta
    whole = model.state_dict() if run.master else {}  # rank 0's tensors, alive until sent
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if on_meta:  # memory for this process's shards, filled below; the rotary tables are computed, not sent
        model.to_empty(device=run.device)
        model.init_rope(run.device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def keep_freed_memory():
    """
    Let glibc's malloc keep freed memory for the next step: by default it returns large blocks to the kernel and
    the next step faults them in again, a third of a demo CPU step (docs/benchmarks.md). The price: the process
    keeps its peak memory. Elsewhere (macOS, Windows, musl) nothing happens.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # blocks up to 1 GB come from the heap, not from mmap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # the heap's free top is returned only past 1 GB


def peak_memory_gb(run):
    """(device, host): the peak of the GPU memory this process allocated (None off CUDA), and the high-water
    mark of its resident memory (None where the system does not say)."""
    device = torch.cuda.max_memory_allocated() / 1e9 if run.device_type == "cuda" else None
    try:
        with open("/proc/self/status") as f:
            host_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return device, host_kb * 1024 / 1e9
    except (OSError, StopIteration):
        pass
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, kilobytes elsewhere
        return device, rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9
    except ImportError:  # Windows
        return device, None


def command_line(run):
    """This process's command as the user typed it, near enough to paste again: torchrun's own options other
    than the process count are not visible from inside."""
    if run.ddp:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", run.world_size))
        nodes = run.world_size // per_node
        launcher = "torchrun " + (f"--nnodes={nodes} " if nodes > 1 else "") + f"--nproc_per_node={per_node}"
    else:
        launcher = "python"
    return launcher + " " + shlex.join(sys.argv)


def git_commit():
    """The kit's git commit ("+changes" when tracked files were edited), or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        changed = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def process_rank():
    """This process's rank under torchrun once its process group is up, else 0."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shared_by_rank0(value, refusal=None):
    """Rank 0's value (any picklable object) on every process. A refusal (SystemExit) that rank 0 met instead
    is raised on every process, so that none waits for a value that never comes (run_main prints it once)."""
    box = [("refused", refusal.code) if refusal is not None else ("value", value)]
    dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if kind == "refused":
        raise refusal if refusal is not None else SystemExit(payload)
    return payload
