"""The attention decoder regrouped for CPU inference: fewer, larger matrix products, fp32 or bf16.

`FusedAttentionDecoder` is what beam search drives on the fast paths (`captioner.runtime.fast.FastPaths`). It computes
what `AttentionDecoder.init`/`step` compute, from copies of the same weights (later changes to the decoder are not
seen): in fp32 the captions are the reference's (up to summation order and rounding; `tests/test_speed_paths.py`),
in bf16 they are within a stated tolerance.

The weight products, fp32 or bf16, and why bf16 is offered: `captioner.runtime.products`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from captioner.models.decoder import AttentionDecoder, StepOutput, Tensors
from captioner.runtime.products import PRODUCT_DTYPES, ActivatedProduct, Product, Products

PROJECT_CHUNK = 8
"""Images per projection call in `init`: the head's wide (8 x 81 x 1280) activations then stay in cache."""


ENERGY_CHUNK = 4
"""Images per pass of the attention energy in `step`. Its (B, K, N, A) activations are 16 MB in fp32 for the
shipped model at 64 images x 3 beams (N = 81 cells, A = 256): a fresh allocation of that size at every step
(page faults), three passes through memory. Four images at a time (1.0 MB, one buffer reused) cut one step's
energy from 3.0-3.2 to 2.4 ms on the 2-core AMX Xeon (chunks of 1, 2, 8 and 16 images: 3.0, 2.5, 2.7, 3.1 ms;
one `step` timed on 64 x 3 rows of the general model with this constant patched)."""


EXP_CLAMP = 80.0
"""Bound of the doubled keys and queries in the factorised attention energy: sigmoid(k + q) = 1 / (1 + exp(-k)
exp(-q)), with exp(-k) computed once per image in `init` and exp(-q) once per row, so the (B, K, N, A) energy
costs a multiply-add and a reciprocal per element instead of an exponential. exp(+-80) is finite in fp32, so a
product is finite, +inf or 0 (giving 0 or 1, as the sigmoid does), never inf * 0. Keys beyond the bound are
clamped to it, which changes no energy while every query is within `EXP_CLAMP - SATURATED` (the clamped sum is
then saturated on the same side as the true one); past that, `step` takes the sigmoid form. The general model's
doubled keys reach 91 and its queries 58 (64 Flickr8k images)."""
SATURATED = 17.0
"""sigmoid(17) and sigmoid(-17) round to 1 and to 4e-8 in fp32: beyond +-17 an energy no longer changes."""
FACTORISED_IMAGES = 16
"""Images from which `init` prepares the factorised energy. One step's energy of the general model, 2-core AMX
Xeon, factorised against sigmoid form: 1 image 51 against 36 us, 4: 81 against 82, 8: 163 against 162, 16: 286
against 323, 64: 1,023 against 1,275 (2026-12-04): below 16 images its extra operations cost more than the
exponentials they save."""




SKIP_ENDED_ROWS = 48
"""Rows from which `FusedAttentionDecoder.step` skips the products of ended rows. A beam that has emitted <end>
keeps its slot until every beam of its image has ended (`captioner.decoding`): 14% of the rows the general model's
search ran (256 Flickr8k photos in batches of 64, beam 3). With many rows the products are bound by arithmetic
and skipping those rows saves their share; with a beam's few rows they are bound by reading the weights, which
skipping does not change, while the gathers and scatters still cost. Beam search alone, 2-core Zen 4 EPYC
(2026-12-07), ms per image with skipping at every size against never: 1 image 22.3 against 18.9, 2 images 12.1
against 10.8, 4 images 7.4 against 7.3, 8 images 5.9 against 6.0, 16 images 4.8 against 4.8, 32 images 5.7
against 5.6, 64 images 4.2-4.9 against 4.7-5.1 (medians of 7-12 alternating rounds; docs/performance.md). From 8
images up the differences are within the noise of that machine, so 48 rows (16 images) is a cautious choice."""


def _live_rows(ended: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows to compute, rows to skip) when `ended` rows may be skipped, or None to compute every row."""
    if ended is None or ended.numel() < SKIP_ENDED_ROWS:
        return None
    skipped = ended.nonzero().squeeze(1)
    if not 0 < skipped.numel() < ended.numel():
        return None
    return (~ended).nonzero().squeeze(1), skipped


def _on_rows(product: Product, x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor] | None,
             base: torch.Tensor | None = None) -> torch.Tensor:
    """`product(x, base)` on the rows `rows[0]` only (`rows` None: on all). The skipped rows `rows[1]` get
    `base`'s rows, written in place (it must be the caller's own), or zeros."""
    if rows is None:
        return product(x, base)
    live, skipped = rows
    y = product(x.index_select(0, live), None if base is None else base.index_select(0, live))
    if base is None:  # zeros written to the skipped rows alone: a (R, V) fill would cost more than it saves
        return y.new_empty(x.size(0), y.size(1)).index_copy_(0, live, y).index_fill_(0, skipped, 0.0)
    return base.index_copy_(0, live, y)




class FusedAttentionDecoder:
    """`AttentionDecoder.init`/`step` with fused weights, for inference (dropout off, no gradients).

    Per step: one (H -> A + F + 4H) product for the attention query, the context gate and the LSTM's recurrent
    term; the word's LSTM input term is a row of a precomputed (V, 4H) table, the context's is added in the same
    product. The attention score's bias is dropped (softmax ignores a constant shift). The memory (projected
    features and attention keys) stays at one row per image and is broadcast over the beams. With the deep output,
    the word's share of the readout (its embedding plus L_h's bias) is a row of a (V, E) table.

    The attention energy `w . tanh(u)` over every beam x grid cell x attention unit is computed as
    `2w . sigmoid(2u)`: tanh(u) = 2 sigmoid(2u) - 1, and the `- w.1` it drops is the same for every grid cell,
    which the softmax ignores. Doubling is exact in floating point, so the keys, the query's weight rows and
    bias, and the score weights are stored doubled.
    PyTorch's CPU tanh is about 10x slower than its sigmoid (2.2 against 0.22 ms for one step's 2M values at
    32 images): the tanh took 17% of the decoder's time, and without it the decoder ran 19% faster in
    `benchmarks/batch_captioning.py` (187 to 223 images/s). The sigmoid itself is then factorised into a
    per-image and a per-row exponential (`EXP_CLAMP`), so the energy needs no exponential per element.

    `products="bf16"` runs the weight products of `init` and `step` (every product with a weight matrix) with bf16
    inputs (see `Product`); the tables and everything between the products stay fp32. `projection` (default: as
    `products`) sets the arithmetic of `init`'s per-image projection alone (the tuned encoder head and the
    projection to the attention features): "bf16" there with fp32 elsewhere is precision "bf16-encoder"'s mix.

    Why the projection can be bf16 on its own: it runs once per image, not once per beam and step, so its
    rounding reaches the steps only through the features, and it is a fifth of the decoder's arithmetic at batch
    64. On a 2-core Zen 4 EPYC (2026-12-07), beam search of 192 photos in batches of 64 took 3.61-3.79 against
    4.03-4.51 ms per image with it in bf16, and of the general model's 1,150 dev captions under "bf16-encoder"
    six changed, all on Flickr8k (dev CIDEr-D 0.5557 and 0.7121 against 0.5559 and 0.7121). The step products
    stay fp32 there: with them in bf16 too, coco_small dev fell 0.007-0.013 below fp32 (docs/performance.md).

    In fp32 the step's products keep their weights in fp16 where every weight is an fp16 value, as in the shipped
    models (`fp16_weight_linear`): the same numbers read at half the bytes, which is what one image's search is
    bound by. `init`'s products, run once per image on many rows, stay on oneDNN's fp32 product.
    """

    memory_per_image = True
    skips_ended_rows = True

    def __init__(self, decoder: AttentionDecoder, products: Products = "fp32", projection: Products | None = None):
        if not isinstance(decoder, AttentionDecoder):
            raise TypeError(f"FusedAttentionDecoder needs an AttentionDecoder, got {type(decoder).__name__}")
        projection = products if projection is None else projection
        for kind in (products, projection):
            if kind not in PRODUCT_DTYPES:
                raise ValueError(f"unknown products {kind!r}; choose one of {', '.join(PRODUCT_DTYPES)}")
        self.products, self.projection = products, projection
        dtype = PRODUCT_DTYPES[products]
        d = decoder
        with torch.no_grad():
            E = d.embed.embedding_dim
            w_ih = d.lstm.weight_ih.float()  # (4H, E + F)
            self.word_gates = torch.addmm(d.lstm.bias_ih.float(), d.embed.weight.float(), w_ih[:, :E].t())  # (V, 4H)
            step = {"dtype": dtype, "fp16_weights": True}  # the step's products: bound by reading their weights
            self.context = Product(w_ih[:, E:].t(), None, **step)  # (F, 4H)
            hidden = torch.cat([2 * d.att_hidden.weight, d.gate.weight, d.lstm.weight_hh])  # (A + F + 4H, H)
            bias = torch.cat([2 * d.att_hidden.bias, d.gate.bias, d.lstm.bias_hh])  # the query doubled: sigmoid form
            self.hidden = Product(hidden.t(), bias, **step)
            self.score_w = 2 * d.att_score.weight.float().view(-1, 1)  # (A, 1)
            self.out = Product.of(d.out, **step)  # (H, V), or (E, V) with the deep output
            self.deep = d.cfg.deep_output
            if self.deep:  # readout = tanh(embed[word] + L_h h + L_z context): a table row and two products
                self.readout_words = (d.embed.weight.float() + d.readout_hidden.bias.float()).contiguous()  # (V, E)
                self.readout_hidden = Product(d.readout_hidden.weight.t(), None, **step)  # (H, E)
                self.readout_context = Product(d.readout_context.weight.t(), None, **step)  # (F, E)
            # init's products: the per-image projection (a third of the decoder's arithmetic) and the keys.
            self.project = self._projection(list(d.project.children()), PRODUCT_DTYPES[projection])
            # the last product writes into `init`'s features, where the activations after it work in place
            self._last_product = max((i for i, layer in enumerate(self.project) if isinstance(layer, Product)),
                                     default=-1)
            self.feature_dim = d.att_feat.in_features  # F
            self.keys = Product.of(d.att_feat, dtype, scale=2)  # doubled for the sigmoid form
            self.initial = Product(torch.cat([d.init_h.weight, d.init_c.weight]).t(),
                                   torch.cat([d.init_h.bias, d.init_c.bias]), dtype)  # mean feature -> (h, c)
        self.split = (d.att_hidden.out_features, d.gate.out_features, 4 * d.lstm.hidden_size)

    @staticmethod
    def _projection(layers: list[nn.Module], dtype: torch.dtype) -> list[Product | ActivatedProduct | nn.Module]:
        """The per-image layers as products: a bf16 Linear + activation whose output feeds another Linear as one
        `ActivatedProduct`; other activations in place on the product just computed (never on the caller's
        features)."""
        project: list[Product | ActivatedProduct | nn.Module] = []
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, nn.Linear):
                fused = None
                if dtype == torch.bfloat16 and i + 1 < len(layers) and any(
                        isinstance(later, nn.Linear) for later in layers[i + 2:]):
                    fused = ActivatedProduct.of(layer, layers[i + 1])
                if fused is not None:
                    project.append(fused)
                    i += 2
                    continue
                layer = Product.of(layer, dtype)
            elif project and isinstance(project[-1], Product) and hasattr(layer, "inplace"):
                layer = copy.copy(layer)
                layer.inplace = True
            project.append(layer)
            i += 1
        return project

    def init(self, features: torch.Tensor) -> tuple[Tensors, Tensors]:
        with torch.inference_mode():
            B, N = features.shape[:2]
            feats = torch.empty(B, N, self.feature_dim)  # the search's own: beam search overwrites its rows
            for start, chunk in zip(range(0, B, PROJECT_CHUNK), features.float().split(PROJECT_CHUNK)):
                target = feats[start:start + chunk.size(0)]
                for i, layer in enumerate(self.project):  # feature dropout is off in inference
                    chunk = layer(chunk, out=target) if i == self._last_product else layer(chunk)
                if chunk.data_ptr() != target.data_ptr():  # no product: the features themselves, copied
                    target.copy_(chunk)
            h, c = torch.tanh_(self.initial(feats.mean(1))).chunk(2, dim=1)  # (B, H) each
            state = {"h": h, "c": c}
            # Under new names: the reference `step` must not be handed these keys (`EXP_CLAMP`).
            keys = self.keys(feats)  # doubled
            if B < FACTORISED_IMAGES:
                return {"feats": feats, "doubled_keys": keys}, state
            low, high = torch.aminmax(keys)  # one pass; a bound for every image is all `_scores` needs
            key_absmax = torch.maximum(low.abs(), high).expand(B).contiguous()  # (B,), so that rows can leave
            exp_keys = keys.clamp_(-EXP_CLAMP, EXP_CLAMP).neg_().exp_()
            return {"feats": feats, "exp_keys": exp_keys, "key_absmax": key_absmax}, state

    def step(self, tokens: torch.Tensor, memory: Tensors, state: Tensors, return_gates: bool = False,
             ended: torch.Tensor | None = None) -> StepOutput:
        """One step for R rows. `ended` (R,) bool marks rows whose hypothesis has ended (beam search passes it,
        `skips_ended_rows`): their weight products are skipped, and their logits, state, attention and gates are
        left meaningless but finite: the search replaces an ended row's candidates by <end>, so they never reach
        a result, though their state is handed back to the next step. Every other row gets what it would without
        `ended`, up to rounding: a product of fewer rows may sum in another order, and the attention energy may
        take its other exact form (`_scores` chooses it from every row's query). From `SKIP_ENDED_ROWS` rows up."""
        feats = memory["feats"]  # (B, N, F)
        B, N = feats.shape[:2]
        A = self.score_w.size(0)
        R = tokens.size(0)  # B * K rows, image-major (K = 1 at the first step)
        live = _live_rows(ended)  # None: every row
        h, c = state["h"], state["c"]  # (R, H)
        query, gate, recurrent = _on_rows(self.hidden, h, live).split(self.split, dim=1)
        alpha = torch.softmax(self._scores(memory, query.view(B, R // B, 1, A)), dim=2)  # (B, K, N)
        context = torch.bmm(alpha, feats).view(R, -1).mul_(torch.sigmoid_(gate))  # (R, F)
        z = _on_rows(self.context, context, live, self.word_gates.index_select(0, tokens).add_(recurrent))  # (R, 4H)
        i, f, g, o = z.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = torch.addcmul(f * c, i, g)
        h_new = o * torch.tanh(c_new)
        readout = h_new
        if self.deep:
            readout = _on_rows(self.readout_hidden, h_new, live, self.readout_words.index_select(0, tokens))
            readout = torch.tanh_(_on_rows(self.readout_context, context, live, readout))  # (R, E)
        logits = _on_rows(self.out, readout, live)  # (R, V)
        gates = {"input": i, "forget": f, "output": o, "cell": c_new} if return_gates else None
        return StepOutput(logits, {"h": h_new, "c": c_new}, alpha.view(R, N), gates)

    def _scores(self, memory: Tensors, query: torch.Tensor) -> torch.Tensor:
        """Attention scores (B, K, N) = 2w . sigmoid(keys + query) for the doubled keys (B, N, A) and `query`
        (B, K, 1, A), `ENERGY_CHUNK` images at a time through one reused buffer: factorised (`EXP_CLAMP`) when the
        query allows it (and `init` prepared it, `FACTORISED_IMAGES`), else in the sigmoid form."""
        factorised = "exp_keys" in memory
        if factorised:
            limit = EXP_CLAMP - SATURATED if bool(memory["key_absmax"].amax() > EXP_CLAMP) else EXP_CLAMP
            factorised = bool(query.abs().amax() <= limit)
        if factorised:
            keys, query = memory["exp_keys"], torch.exp(query.neg())
        else:
            keys = memory["doubled_keys"] if "doubled_keys" in memory else self.keys(memory["feats"])
        B, N, A = keys.shape
        K = query.size(1)
        scores = keys.new_empty(B, K, N, 1)
        buffer = keys.new_empty(min(B, ENERGY_CHUNK), K, N, A)
        one = keys.new_ones(())
        for start in range(0, B, ENERGY_CHUNK):
            stop = min(start + ENERGY_CHUNK, B)
            energy = buffer[: stop - start]
            if factorised:  # 1 / (1 + exp(-k) exp(-q)) = sigmoid(k + q)
                torch.addcmul(one, keys[start:stop].unsqueeze(1), query[start:stop], out=energy).reciprocal_()
            else:
                torch.add(keys[start:stop].unsqueeze(1), query[start:stop], out=energy).sigmoid_()
            torch.matmul(energy, self.score_w, out=scores[start:stop])
        return scores.view(B, K, N)
