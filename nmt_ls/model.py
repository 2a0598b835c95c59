"""Transformer encoder-decoder for NMT.

Conventions:
    * ``src`` and ``tgt_in`` are right-padded with ``pad_id``. Source padding is masked
      in encoder self-attention and in cross-attention. Target padding needs no mask:
      the causal mask already keeps real positions from seeing the pads after them.
    * One embedding matrix is shared by source and target (joint vocabulary). By default
      the output projection is tied to it as well.
    * ``forward`` returns logits (or, with ``features_only=True``, the decoder features
      before the output projection) and never a loss; the loss lives in ``criterions``.

Incremental decoding uses a cache, a list with one dict per decoder layer:
``{"self_k", "self_v"}`` grow by one position each step, and ``{"cross_k", "cross_v"}``
are computed from ``memory`` on the first step and reused after that. Create one with
:meth:`Seq2Seq.new_cache` and reorder it with :meth:`Seq2Seq.reorder_cache` for beam search.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Cache = list[dict[str, Tensor]]


def sinusoidal_table(max_positions: int, d_model: int) -> Tensor:
    """Sinusoidal position table as in Vaswani et al. (2017).

    Returns:
        Tensor: shape (max_positions, d_model); sin in the even columns, cos in the odd ones.
    """
    pos = torch.arange(max_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_positions, d_model)  # (P, D)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return table


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    B, T, D = x.shape
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2)  # (B, H, T, D/H)


def _merge_heads(x: Tensor) -> Tensor:
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, D)


class _MultiHead(nn.Module):
    """What both attentions share: ``n_heads`` heads splitting ``d_model``, attention dropout."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout


class SelfAttention(_MultiHead):
    """Multi-head self-attention with a fused QKV projection and an optional K/V cache."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0):
        super().__init__(d_model, n_heads, attn_dropout)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self, x: Tensor, key_mask: Tensor | None = None, causal: bool = False, cache: dict[str, Tensor] | None = None
    ) -> Tensor:
        """
        Args:
            x (Tensor): shape (B, T, D).
            key_mask (Tensor, optional): bool, shape (B, 1, 1, T), True where a key may be
                attended to (encoder padding). Not to be combined with ``causal``.
            causal (bool): position t attends to positions <= t only.
            cache (dict, optional): holds "self_k"/"self_v" of the previous positions, shape
                (B, H, P, D/H); the new keys and values are appended to it in place.
        Returns:
            Tensor: shape (B, T, D).
        """
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads)  # (B, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D/H)
        mask, is_causal = key_mask, causal
        if cache is not None:
            if "self_k" in cache:
                k = torch.cat([cache["self_k"], k], dim=2)  # (B, H, P + T, D/H)
                v = torch.cat([cache["self_v"], v], dim=2)
            cache["self_k"], cache["self_v"] = k, v
            past = k.size(2) - T
            if causal and past > 0:
                # SDPA's is_causal aligns the mask top-left; with a prefix we shift it by hand.
                is_causal = False
                mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        dropout_p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return self.out(_merge_heads(out))


class CrossAttention(_MultiHead):
    """Multi-head attention from decoder states to encoder memory; K/V can be cached."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0):
        super().__init__(d_model, n_heads, attn_dropout)
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self, x: Tensor, memory: Tensor, key_mask: Tensor | None = None, cache: dict[str, Tensor] | None = None
    ) -> Tensor:
        """
        Args:
            x (Tensor): decoder states, shape (B, T, D).
            memory (Tensor): encoder output, shape (B, S, D).
            key_mask (Tensor, optional): bool, shape (B, 1, 1, S), True at real source tokens.
            cache (dict, optional): "cross_k"/"cross_v" are computed from ``memory`` once and
                reused on later calls (``memory`` is then ignored).
        Returns:
            Tensor: shape (B, T, D).
        """
        q = _split_heads(self.q(x), self.n_heads)  # (B, H, T, D/H)
        if cache is not None and "cross_k" in cache:
            k, v = cache["cross_k"], cache["cross_v"]
        else:
            k, v = (_split_heads(t, self.n_heads) for t in self.kv(memory).chunk(2, dim=-1))  # (B, H, S, D/H)
            if cache is not None:
                cache["cross_k"], cache["cross_v"] = k, v
        dropout_p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)
        return self.out(_merge_heads(out))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__(nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, d_model))


class _Layer(nn.Module):
    """Residual wiring shared by encoder and decoder layers."""

    def __init__(self, dropout: float, pre_norm: bool):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def residual(self, x: Tensor, norm: nn.LayerNorm, fn) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))


class EncoderLayer(_Layer):
    def __init__(self, d_model, n_heads, ffn_dim, dropout, attn_dropout, pre_norm):
        super().__init__(dropout, pre_norm)
        self.self_attn = SelfAttention(d_model, n_heads, attn_dropout)
        self.ffn = FeedForward(d_model, ffn_dim)
        self.norm_attn = nn.LayerNorm(d_model)
        self.norm_ffn = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = self.residual(x, self.norm_attn, lambda h: self.self_attn(h, key_mask))
        return self.residual(x, self.norm_ffn, self.ffn)


class DecoderLayer(_Layer):
    def __init__(self, d_model, n_heads, ffn_dim, dropout, attn_dropout, pre_norm):
        super().__init__(dropout, pre_norm)
        self.self_attn = SelfAttention(d_model, n_heads, attn_dropout)
        self.cross_attn = CrossAttention(d_model, n_heads, attn_dropout)
        self.ffn = FeedForward(d_model, ffn_dim)
        self.norm_self = nn.LayerNorm(d_model)
        self.norm_cross = nn.LayerNorm(d_model)
        self.norm_ffn = nn.LayerNorm(d_model)

    def forward(
        self, x: Tensor, memory: Tensor, key_mask: Tensor | None, cache: dict[str, Tensor] | None = None
    ) -> Tensor:
        x = self.residual(x, self.norm_self, lambda h: self.self_attn(h, causal=True, cache=cache))
        x = self.residual(x, self.norm_cross, lambda h: self.cross_attn(h, memory, key_mask, cache=cache))
        return self.residual(x, self.norm_ffn, self.ffn)


@dataclass(frozen=True)
class Architecture:
    """The hyperparameters of a :class:`Seq2Seq` besides its vocabulary.

    Args:
        d_model (int): model width D. Default: 256
        n_heads (int): attention heads; must divide ``d_model``. Default: 4
        ffn_dim (int): hidden size of the ReLU feed-forward blocks. Default: 1024
        enc_layers (int): encoder layers. Default: 3
        dec_layers (int): decoder layers. Default: 3
        dropout (float): dropout on embeddings and on every residual branch. Default: 0.1
        attn_dropout (float): dropout on attention weights. Default: 0.0
        max_positions (int): longest sequence (source, or target including bos). Default: 1024
        pre_norm (bool): LayerNorm before each sublayer plus a final LayerNorm on encoder and
            decoder output; False gives the original post-norm Transformer. Default: True
        positions (str): "sinusoidal" (fixed) or "learned". Default: "sinusoidal"
        tie_embeddings (bool): use the embedding matrix as the output projection. Default: True
    """

    d_model: int = 256
    n_heads: int = 4
    ffn_dim: int = 1024
    enc_layers: int = 3
    dec_layers: int = 3
    dropout: float = 0.1
    attn_dropout: float = 0.0
    max_positions: int = 1024
    pre_norm: bool = True
    positions: str = "sinusoidal"
    tie_embeddings: bool = True


class Seq2Seq(nn.Module):
    """Transformer encoder-decoder with a shared source/target embedding.

    Args:
        vocab_size (int): size V of the joint vocabulary.
        arch (Architecture): widths, depths, dropouts and variants. Default: ``Architecture()``
        pad_id (int): padding id; its embedding row starts at zero. Default: 0

    Shape:
        src: (B, S) token ids; tgt_in: (B, T) token ids starting with bos; output: (B, T, V),
        or the decoder features (B, T, D) with ``features_only=True``.

    Example::
        >>> model = Seq2Seq(8000, Architecture(d_model=512, n_heads=8))
        >>> logits = model(src, tgt_in)  # (B, T, V)
    """

    def __init__(self, vocab_size: int, arch: Architecture | None = None, pad_id: int = 0):
        super().__init__()
        arch = Architecture() if arch is None else arch
        if arch.positions not in ("sinusoidal", "learned"):
            raise ValueError(f"positions must be 'sinusoidal' or 'learned', got {arch.positions!r}")
        d_model = arch.d_model
        self.arch = arch
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.pad_id = pad_id
        self.max_positions = arch.max_positions
        self.embed_scale = math.sqrt(d_model)

        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        if arch.positions == "learned":
            self.pos_embed = nn.Embedding(arch.max_positions, d_model)
        else:
            self.pos_embed = None
            self.register_buffer("pos_table", sinusoidal_table(arch.max_positions, d_model), persistent=False)
        self.dropout = nn.Dropout(arch.dropout)

        layer_args = (d_model, arch.n_heads, arch.ffn_dim, arch.dropout, arch.attn_dropout, arch.pre_norm)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(arch.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(arch.dec_layers))
        self.enc_norm = nn.LayerNorm(d_model) if arch.pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(d_model) if arch.pre_norm else nn.Identity()
        self.out_proj = None if arch.tie_embeddings else nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linears (Q, K and V each on its own), zero biases, N(0, D^-0.5) embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # A fused projection is initialised as if its parts were separate D x D matrices.
        for module in self.modules():
            if isinstance(module, SelfAttention):
                for chunk in module.qkv.weight.chunk(3, dim=0):
                    nn.init.xavier_uniform_(chunk)
            if isinstance(module, CrossAttention):
                for chunk in module.kv.weight.chunk(2, dim=0):
                    nn.init.xavier_uniform_(chunk)
        std = self.d_model**-0.5
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        with torch.no_grad():
            self.embed.weight[self.pad_id].zero_()
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, mean=0.0, std=std)
        if self.out_proj is not None:
            # Same scale as the tied case, so tying changes sharing and nothing else.
            nn.init.normal_(self.out_proj.weight, mean=0.0, std=std)

    @property
    def output_weight(self) -> Tensor:
        """Output projection weight, shape (V, D); the embedding matrix when tied."""
        return self.embed.weight if self.out_proj is None else self.out_proj.weight

    def _embed(self, tokens: Tensor, start_pos: int = 0) -> Tensor:
        T = tokens.size(1)
        if start_pos + T > self.max_positions:
            raise ValueError(f"sequence of length {start_pos + T} exceeds max_positions={self.max_positions}")
        if self.pos_embed is None:
            pos = self.pos_table[start_pos : start_pos + T]  # (T, D)
        else:
            pos = self.pos_embed.weight[start_pos : start_pos + T]
        return self.dropout(self.embed(tokens) * self.embed_scale + pos)  # (B, T, D)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Run the encoder.

        Args:
            src (Tensor): right-padded source ids, shape (B, S).
        Returns:
            (memory, src_pad_mask): memory (B, S, D), and src_pad_mask (B, S), bool, True at pad.
        """
        src_pad_mask = src.eq(self.pad_id)  # (B, S)
        key_mask = self._key_mask(src_pad_mask)
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, key_mask)
        return self.enc_norm(x), src_pad_mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_pad_mask: Tensor, cache: Cache | None = None) -> Tensor:
        """Run the decoder up to (and including) the final norm, before the output projection.

        Args:
            tgt_in (Tensor): target ids, shape (B, T). Without a cache, the whole prefix
                starting with bos. With a cache, only the new positions (usually T=1); their
                positions continue after those already in the cache.
            memory (Tensor): encoder output, shape (B, S, D).
            src_pad_mask (Tensor): bool, shape (B, S), True at source pad.
            cache (list of dict, optional): from :meth:`new_cache`; updated in place.
        Returns:
            Tensor: features, shape (B, T, D).
        """
        start_pos = 0
        if cache is not None and "self_k" in cache[0]:
            start_pos = cache[0]["self_k"].size(2)
        key_mask = self._key_mask(src_pad_mask)
        x = self._embed(tgt_in, start_pos)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, key_mask, cache=None if cache is None else cache[i])
        return self.dec_norm(x)

    def project(self, features: Tensor) -> Tensor:
        """Output layer: features (..., D) -> logits (..., V)."""
        return F.linear(features, self.output_weight)

    def decoder_features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Encoder plus decoder, without the output projection: (B, S), (B, T) -> (B, T, D)."""
        memory, src_pad_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_pad_mask)

    def forward(self, src: Tensor, tgt_in: Tensor, features_only: bool = False) -> Tensor:
        """Logits for teacher-forced decoding: (B, S), (B, T) -> (B, T, V); with
        ``features_only`` (fairseq's name) the decoder features (B, T, D) instead, as
        :meth:`decoder_features` gives them, for a criterion that applies :meth:`project`
        itself (through DistributedDataParallel, which sees only ``forward``)."""
        features = self.decoder_features(src, tgt_in)  # (B, T, D)
        return features if features_only else self.project(features)

    def new_cache(self) -> Cache:
        """An empty incremental-decoding cache: one dict per decoder layer."""
        return [{} for _ in self.decoder]

    @staticmethod
    def reorder_cache(cache: Cache, new_order: Tensor) -> Cache:
        """Select batch rows of every cached tensor in place (beam reordering, dropping rows).

        Args:
            cache (list of dict): as returned by :meth:`new_cache` and filled by :meth:`decode`.
            new_order (Tensor): long, shape (B',), row indices into the current batch.
        """
        for layer_cache in cache:
            for name, t in layer_cache.items():
                layer_cache[name] = t.index_select(0, new_order)
        return cache

    @staticmethod
    def _key_mask(src_pad_mask: Tensor) -> Tensor | None:
        # SDPA wants True where attention is allowed; no mask at all is the fastest path.
        if not src_pad_mask.any():
            return None
        return ~src_pad_mask[:, None, None, :]  # (B, 1, 1, S)


def build_model(vocab_size: int, pad_id: int, **model_kwargs) -> Seq2Seq:
    """Build a :class:`Seq2Seq` from flat keyword arguments (the fields of :class:`Architecture`:
    d_model, n_heads, ffn_dim, enc_layers, dec_layers, dropout, attn_dropout, pre_norm,
    positions, tie_embeddings, max_positions), which become its :class:`Architecture`."""
    return Seq2Seq(vocab_size, Architecture(**model_kwargs), pad_id=pad_id)
