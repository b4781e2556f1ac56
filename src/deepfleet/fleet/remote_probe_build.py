"""Probe part that runs ON each host (stdlib only, Python >= 3.8): what building DeepSpeed's ops needs,
and which ops this environment's DeepSpeed has prebuilt, read from its install record, not imported.

An op that is not prebuilt is built at first use by torch's JIT loader (DeepSpeed's OpBuilder.jit_load):
it runs `ninja` from PATH and `$CXX` (default `c++`), includes Python.h, and for CUDA ops runs
$CUDA_HOME/bin/nvcc with CUDA_HOME's headers; async_io also needs libaio's header and `-laio`.
`build_facts()` returns
  {"cuda_home", "cuda_headers", "nvcc": {"path", "version"} | None, "ninja", "ninja_in_env", "cxx",
   "python_headers", "libaio": {"header", "library"}, "deepspeed_ops": {"prebuilt", "accelerator",
   "torch", "cuda", "hip"} | None}
"""

import json
import os
import re
import shutil
import subprocess
import sysconfig

INCLUDE_DIRS = ("/usr/include", "/usr/local/include")


def find_cuda_home():
    """As torch.utils.cpp_extension finds it: $CUDA_HOME or $CUDA_PATH, nvcc's install dir, /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(nvcc))
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda") else None


def parse_nvcc_version(out):
    """"Cuda compilation tools, release 12.4, V12.4.131" -> "12.4"."""
    match = re.search(r"release (\d+\.\d+)", out or "")
    return match.group(1) if match else None


def nvcc_facts(cuda_home):
    """The nvcc torch would run ($CUDA_HOME/bin/nvcc), else the one on PATH; None when neither exists."""
    in_home = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    path = in_home if in_home and os.access(in_home, os.X_OK) else shutil.which("nvcc")
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return {"path": path, "version": parse_nvcc_version(out)}


def library_dirs():
    multiarch = sysconfig.get_config_var("MULTIARCH")
    arch_dirs = ["/usr/lib/" + multiarch, "/lib/" + multiarch] if multiarch else []
    return arch_dirs + ["/usr/lib64", "/lib64", "/usr/lib", "/lib", "/usr/local/lib"]


def libaio_facts():
    """libaio-dev's files: the link needs the unversioned libaio.so (`-laio`), which `ldconfig -p` does
    not list (it shows the runtime's libaio.so.1), and the build includes libaio.h."""
    return {"header": _first_existing(INCLUDE_DIRS, "libaio.h"),
            "library": _first_existing(library_dirs(), "libaio.so")}


def _first_existing(dirs, name):
    return next((os.path.join(d, name) for d in dirs if os.path.exists(os.path.join(d, name))), None)


def _python_literal(text):
    """A literal as setup.py writes it (repr of a dict of str, bool and number values) -> its value.
    Not ast.literal_eval: importing ast costs 8 ms, a third of the probe's own time."""
    words = {"True": "true", "False": "false", "None": "null"}
    as_json = re.sub(r"'([^'\\]*)'|\b(True|False|None)\b",
                     lambda m: json.dumps(m.group(1)) if m.group(2) is None else words[m.group(2)], text)
    try:
        return json.loads(as_json)
    except ValueError:
        return None


def parse_install_record(text):
    """DeepSpeed's setup.py writes git_version_info_installed.py, one `name=<repr>` a line: installed_ops
    (op -> prebuilt), accelerator_name and torch_info. DeepSpeed loads a prebuilt op only on that
    accelerator and with that torch (and CUDA/HIP) major.minor."""
    values = {}
    for line in text.splitlines():
        name, sep, literal = line.partition("=")
        if sep and name.strip().isidentifier():
            values[name.strip()] = _python_literal(literal.strip())
    ops, torch_info = values.get("installed_ops") or {}, values.get("torch_info") or {}
    if not isinstance(ops, dict) or not isinstance(torch_info, dict):
        return None
    return {"prebuilt": sorted(op for op, built in ops.items() if built), "accelerator": values.get("accelerator_name"),
            "torch": torch_info.get("version"), "cuda": torch_info.get("cuda_version"),
            "hip": torch_info.get("hip_version")}


def deepspeed_ops_facts(deepspeed_origin):
    """From `import deepspeed`'s __init__.py path; None when DeepSpeed or its install record is missing."""
    if not deepspeed_origin:
        return None
    try:
        with open(os.path.join(os.path.dirname(deepspeed_origin), "git_version_info_installed.py")) as handle:
            return parse_install_record(handle.read())
    except OSError:
        return None


def build_facts(deepspeed_origin):
    cuda_home = find_cuda_home()
    in_env = os.path.join(sysconfig.get_path("scripts"), "ninja")   # the pip `ninja` package, DeepSpeed's dependency
    return {
        "cuda_home": cuda_home,
        "cuda_headers": bool(cuda_home) and os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")),
        "nvcc": nvcc_facts(cuda_home),
        "ninja": shutil.which("ninja"),
        "ninja_in_env": in_env if os.access(in_env, os.X_OK) else None,
        "cxx": shutil.which((os.environ.get("CXX") or "c++").split()[0]),
        "python_headers": os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
        "libaio": libaio_facts(),
        "deepspeed_ops": deepspeed_ops_facts(deepspeed_origin),
    }
