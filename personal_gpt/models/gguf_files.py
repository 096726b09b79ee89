"""GGUF files for the llama.cpp backend: the bundled model re-encoded into a weight
type llama.cpp runs fast here, peft LoRA adapters written as GGUF LoRA adapters, and
the model with an adapter merged into its weights.

Owns: reading/writing GGUF with the ``gguf`` package, the HF -> GGUF tensor names and
the q/k row order llama.cpp expects, atomic publication of the files it writes.
Must not: load torch or llama.cpp, touch the store, or download anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

from personal_gpt.errors import ModelError

# weight types a model file may be re-encoded to (norms and other 1-D tensors stay F32)
MODEL_TYPES = ("Q4_1", "Q8_0", "F16", "BF16", "F32")
# HF Llama projection -> GGUF tensor name inside "blk.N."
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<module>[a-z_]+\.[a-z_]+)\.lora_(?P<part>[AB])\.weight$"
)


class Unsupported(ModelError):
    """An adapter this backend cannot express (the torch path serves it instead)."""


def _publish(write, target: Path) -> Path:
    """Run ``write(tmp_path)`` and move the result onto ``target`` only when complete."""
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # no per-file "Writing ..." lines
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _copy_fields(reader, writer, skip: set[str]) -> None:
    """Copy every key/value of ``reader`` into ``writer`` (except ``skip``), types kept."""
    import gguf

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, kind)


def reencode_model(source: Path, target: Path, weight_type: str) -> Path:
    """Write ``source`` (a GGUF model) to ``target`` with every 2-D weight stored as
    ``weight_type`` (see MODEL_TYPES); metadata and tokenizer are copied as they are.
    The values are those ``source`` holds (de-quantized first), so an F32 copy is exact."""
    import gguf
    import numpy as np

    if weight_type not in MODEL_TYPES:
        raise ValueError(f"unknown weight type {weight_type}")
    wanted = gguf.GGMLQuantizationType[weight_type]
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _copy_fields(reader, writer, skip={"general.architecture", "general.file_type"})
        writer.add_file_type({"Q4_1": 3, "Q8_0": 7, "F16": 1, "BF16": 32, "F32": 0}[weight_type])
        for tensor in reader.tensors:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            values = values.reshape([int(n) for n in reversed(tensor.shape)])
            if values.ndim < 2 or wanted == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tensor.name, values)
            elif wanted == tensor.tensor_type:
                writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_shape=tensor.data.shape,
                                  raw_dtype=tensor.tensor_type)
            elif wanted == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tensor.name, values.astype(np.float16))
            else:
                packed = gguf.quants.quantize(values, wanted)
                writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=wanted)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _publish(write, target)


def model_shape(gguf_path: Path) -> dict:
    """Architecture and head counts of a GGUF model (what a LoRA conversion needs)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()
    return {
        "arch": arch,
        "n_head": int(reader.fields[f"{arch}.attention.head_count"].contents()),
        "n_head_kv": int(reader.fields[f"{arch}.attention.head_count_kv"].contents()),
        "n_layer": int(reader.fields[f"{arch}.block_count"].contents()),
    }


def rope_rows(matrix, n_head: int):
    """Rows of a q/k projection (or of a LoRA B for one) reordered from the Hugging
    Face layout (each head: first halves of the rotary pairs, then second halves) to
    llama.cpp's (each head: the two members of every pair side by side)."""
    rows = matrix.shape[0]
    half = rows // n_head // 2
    return matrix.reshape(n_head, 2, half, *matrix.shape[1:]).swapaxes(1, 2).reshape(matrix.shape)


def lora_scalings(config: dict, modules: set[str]) -> dict[str, float]:
    """The factor peft applies to B·A for each module name (rank/alpha patterns and rsLoRA honoured)."""
    import math

    r, alpha = int(config.get("r") or 8), float(config.get("lora_alpha") or 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    result = {}
    for module in modules:
        rank = next((int(v) for k, v in rank_pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), r)
        a = next((float(v) for k, v in alpha_pattern.items() if re.search(rf"(^|\.){re.escape(k)}$", module)), alpha)
        result[module] = a / math.sqrt(rank) if config.get("use_rslora") else a / rank
    return result


def _lora_tensors(adapter_dir: Path, shape: dict) -> list[tuple[str, "object", "object"]]:
    """The peft LoRA adapter in ``adapter_dir`` as (GGUF weight name, A, B) for a model of
    ``shape`` (``model_shape``): float32 arrays, A [rank, in] and B [out, rank] with peft's
    scaling folded into B and q/k rows in llama.cpp's order, so W + B·A is the adapted
    weight. Raises ``Unsupported`` for what llama.cpp cannot express (biases, embeddings,
    the output layer, other modules)."""
    import numpy as np
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        match = _LORA_KEY.match(key)
        if match is None or match["module"] not in HF_TO_GGUF:
            raise Unsupported(f"adapter weight {key} has no llama.cpp counterpart")
        pairs.setdefault((int(match["layer"]), match["module"]), {})[match["part"]] = value
    if not pairs:
        raise Unsupported("the adapter holds no LoRA weights")
    scalings = lora_scalings(config, {f"model.layers.{layer}.{module}" for layer, module in pairs})
    out = []
    for (layer, module), parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"} or layer >= shape["n_layer"]:
            raise Unsupported(f"layer {layer} {module}: incomplete or out of range")
        a = parts["A"].astype(np.float32)
        b = parts["B"].astype(np.float32) * np.float32(scalings[f"model.layers.{layer}.{module}"])
        if module == "self_attn.q_proj":
            b = rope_rows(b, shape["n_head"])
        elif module == "self_attn.k_proj":
            b = rope_rows(b, shape["n_head_kv"])
        out.append((f"blk.{layer}.{HF_TO_GGUF[module]}.weight", np.ascontiguousarray(a), np.ascontiguousarray(b)))
    return out


def lora_to_gguf(adapter_dir: Path, target: Path, shape: dict) -> Path:
    """Write the peft LoRA adapter in ``adapter_dir`` as a GGUF LoRA adapter for a model
    of ``shape`` (``model_shape``). peft's scaling is folded into each B (the file's
    alpha is 0, so llama.cpp applies B·A as is). Raises ``Unsupported`` for what
    llama.cpp cannot express (biases, embeddings, the output layer, other modules)."""
    import gguf

    tensors = _lora_tensors(adapter_dir, shape)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), shape["arch"])
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 0.0)  # 0: llama.cpp uses B·A unscaled
        for name, a, b in tensors:
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _publish(write, Path(target))


def merge_lora(model: Path, adapter_dir: Path, target: Path, shape: dict) -> Path:
    """Write ``model`` (a GGUF model) to ``target`` with the peft LoRA adapter in
    ``adapter_dir`` merged into its weights: each adapted weight becomes W + B·A, computed
    in float32 and stored in W's own type; every other tensor, the metadata and the
    tokenizer are copied as they are. llama.cpp then runs the adapted model as fast as the
    plain one (a LoRA applied at run time adds two small products per weight and step).
    Raises ``Unsupported`` as ``lora_to_gguf`` does, or when a weight is missing."""
    import gguf
    import numpy as np

    deltas = {name: (a, b) for name, a, b in _lora_tensors(adapter_dir, shape)}
    reader = gguf.GGUFReader(str(model))
    missing = set(deltas) - {t.name for t in reader.tensors}
    if missing:
        raise Unsupported(f"the model has no weight {sorted(missing)[0]}")
    arch = reader.fields["general.architecture"].contents()

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _copy_fields(reader, writer, skip={"general.architecture"})
        for tensor in reader.tensors:
            delta = deltas.get(tensor.name)
            if delta is None:
                writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_shape=tensor.data.shape,
                                  raw_dtype=tensor.tensor_type)
                continue
            a, b = delta
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            values = values.reshape([int(n) for n in reversed(tensor.shape)])
            if values.shape != (b.shape[0], a.shape[1]):
                raise Unsupported(f"{tensor.name} is {values.shape}, the adapter's update "
                                  f"{(b.shape[0], a.shape[1])}")
            values += b @ a
            kind = tensor.tensor_type
            if kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tensor.name, values)
            elif kind == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tensor.name, values.astype(np.float16))
            else:
                packed = gguf.quants.quantize(values, kind)
                writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _publish(write, Path(target))
