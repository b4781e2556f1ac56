"""Doctor's check of DeepSpeed's compiled ops on each host: prebuilt, built at first use, or not buildable.

deepfleet's own optimizer needs no op (torch's fused AdamW on GPUs, torch's AdamW on CPUs). Ops come in
with offload: cpu_adam for optimizer offload (which `deepspeed: auto` may choose), async_io (with
pin_memory) for NVMe offload, and fused_adam only for a DeepSpeed JSON that turns torch_adam off.
Doctor does not know the recipe, so an op that cannot work is a warning at most.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepfleet.fleet.facts import HostFacts
from deepfleet.fleet.findings import FLEET, Collected, Finding, Severity


@dataclass(frozen=True, kw_only=True)
class OpUse:
    name: str                        # DeepSpeed's op name, as in its installed_ops
    used_for: str
    build_vars: str                  # DeepSpeed's setup.py switches that prebuild it
    loads_with: tuple[str, ...] = ()   # ops it loads first
    cuda_op: bool = False            # on an NVIDIA host, compiled against CUDA_HOME (a CUDAOpBuilder)
    needs_nvcc: bool = False         # has .cu sources
    needs_libaio: bool = False
    gpu_only: bool = False
    planner_may_use: bool = False    # deepfleet may need it without the recipe naming it


OPS = (
    OpUse(name="cpu_adam", used_for="optimizer offload", build_vars="DS_BUILD_CPU_ADAM=1", planner_may_use=True),
    OpUse(name="async_io", used_for="NVMe offload", build_vars="DS_BUILD_AIO=1 DS_BUILD_PIN_MEMORY=1",
          loads_with=("pin_memory",), cuda_op=True, needs_libaio=True),
    OpUse(name="fused_adam", used_for="DeepSpeed's FusedAdam: only a DeepSpeed JSON without torch_adam uses it",
          build_vars="DS_BUILD_FUSED_ADAM=1", cuda_op=True, needs_nvcc=True, gpu_only=True),
)


@dataclass(frozen=True, kw_only=True)
class OpStatus:
    state: str                    # "prebuilt", "buildable", "unbuildable", or "refused" (built for another torch)
    detail: str = ""              # the tools a build uses, or the version mismatch
    missing: tuple[str, ...] = ()  # what a build lacks


def _major_minor(version: str | None) -> str | None:
    return ".".join(str(version).split("+")[0].split(".")[:2]) if version else None


def _nvidia(f: HostFacts) -> bool:
    """CUDA toolchain needs apply on NVIDIA hosts (ROCm's hipcc is not probed)."""
    return f.get("accelerators", "count", default=0) > 0 and f.get("accelerators", "vendor") != "amd"


def missing_to_build(op: OpUse, build: dict, *, nvidia: bool, torch_cuda: str | None) -> list[str]:
    """What torch's JIT build of `op` lacks on a host, by name."""
    missing = [name for name, present in (("c++ compiler", build.get("cxx")), ("ninja on PATH", build.get("ninja")),
                                          ("Python headers", build.get("python_headers"))) if not present]
    libaio = build.get("libaio") or {}
    if op.needs_libaio and not (libaio.get("header") and libaio.get("library")):
        missing.append("libaio-dev")
    if nvidia and op.cuda_op and not build.get("cuda_headers"):
        missing.append("CUDA_HOME with the CUDA headers")
    nvcc = build.get("nvcc") or {}
    if nvidia and op.needs_nvcc:
        if not nvcc:
            missing.append("nvcc")
        elif torch_cuda and str(nvcc.get("version")).split(".")[0] != torch_cuda.split(".")[0]:
            missing.append(f"nvcc for CUDA {torch_cuda} (found {nvcc.get('version')})")
    return missing


def _tools(op: OpUse, build: dict, nvidia: bool) -> str:
    tools = ["c++", "ninja"]
    if nvidia and op.needs_nvcc:
        tools.append(f"nvcc {(build.get('nvcc') or {}).get('version')}")
    return ", ".join(tools + (["libaio"] if op.needs_libaio else []))


def _refused_because(op: OpUse, record: dict, f: HostFacts) -> str:
    """Why DeepSpeed refuses its prebuilt copy of `op` here (it raises, it does not rebuild), or ""."""
    torch_here = _major_minor(f.get("packages", "torch", "version"))
    if torch_here and record.get("torch") != torch_here:
        return f"prebuilt for torch {record.get('torch')}, torch here is {torch_here}"
    cuda_here = _major_minor(f.get("accelerators", "cuda"))
    if op.cuda_op and _nvidia(f) and cuda_here and record.get("cuda") != cuda_here:
        return f"prebuilt for CUDA {record.get('cuda')}, torch here uses CUDA {cuda_here}"
    return ""


def op_status(op: OpUse, f: HostFacts) -> OpStatus:
    build, nvidia = f.get("build") or {}, _nvidia(f)
    record = build.get("deepspeed_ops") or {}
    accelerator = "cuda" if f.get("accelerators", "count", default=0) else "cpu"
    if {op.name, *op.loads_with} <= set(record.get("prebuilt") or ()) and record.get("accelerator") == accelerator:
        refused = _refused_because(op, record, f)
        return OpStatus(state="refused" if refused else "prebuilt", detail=refused)
    missing = missing_to_build(op, build, nvidia=nvidia, torch_cuda=f.get("accelerators", "cuda"))
    if missing:
        return OpStatus(state="unbuildable", missing=tuple(missing))
    return OpStatus(state="buildable", detail=_tools(op, build, nvidia))


def _install_fix(missing: str, f: HostFacts) -> str:
    if missing.startswith(("nvcc", "CUDA_HOME")):
        return f"install the CUDA toolkit for CUDA {f.get('accelerators', 'cuda')} and export CUDA_HOME"
    if missing == "ninja on PATH" and f.get("build", "ninja_in_env"):
        return f"apt install ninja-build (torch runs `ninja` from PATH; {f.get('build', 'ninja_in_env')} is not on it)"
    python = ".".join(str(f.get("python", "version")).split(".")[:2])
    return {"c++ compiler": "apt install g++", "ninja on PATH": "apt install ninja-build",
            "Python headers": f"apt install python{python}-dev", "libaio-dev": "apt install libaio-dev"}[missing]


def prebuild_command(op: OpUse, f: HostFacts) -> str:
    python = f.get("python", "executable") or "python"
    version = f.get("packages", "deepspeed", "version")
    return (f"{op.build_vars} {python} -m pip install --no-build-isolation --no-cache-dir --force-reinstall "
            f"--no-deps deepspeed{'==' + version if version else ''}")


def op_finding(op: OpUse, status: OpStatus, f: HostFacts) -> Finding:
    cannot_work = status.state in ("unbuildable", "refused")
    severity: Severity = "warn" if cannot_work and op.planner_may_use else "ok"
    message = {"prebuilt": f"{op.name} prebuilt ({op.used_for})",
               "buildable": f"{op.name} not prebuilt: built at first use with {status.detail} ({op.used_for})",
               "unbuildable": f"{op.name} not prebuilt and cannot be built here, no {', '.join(status.missing)} "
                              f"({op.used_for})",
               "refused": f"{op.name} {status.detail}: DeepSpeed refuses to load it ({op.used_for})"}[status.state]
    fix = {"prebuilt": "",
           "buildable": f"optional, skips the build at first use: {prebuild_command(op, f)}",
           "unbuildable": "; ".join(dict.fromkeys(_install_fix(missing, f) for missing in status.missing)),
           "refused": f"rebuild it for this torch: {prebuild_command(op, f)}"}[status.state]
    return Finding(check="deepspeed-ops", host=f.host.name, severity=severity, message=message, fix=fix)


def check_deepspeed_ops(c: Collected) -> list[Finding]:
    """Per op, one fleet-wide finding when every host says the same, else one per host."""
    hosts = [f for f in c.reachable if f.get("build") and f.get("packages", "deepspeed", "version")]
    found = []
    for op in OPS:
        applies = [f for f in hosts if not op.gpu_only or _nvidia(f)]
        findings = [op_finding(op, op_status(op, f), f) for f in applies]
        if len(findings) > 1 and len({(x.severity, x.message, x.fix) for x in findings}) == 1:
            findings = [Finding(check=findings[0].check, host=FLEET, severity=findings[0].severity,
                                message=findings[0].message, fix=findings[0].fix)]
        found += findings
    return found
