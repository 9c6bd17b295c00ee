"""A mixed batch (``adapter_names=``, one adapter per row of the batch) through a LoRA layer: the base output for
every row, plus each adapter's update on its own rows only, so that gradients reach each adapter from its rows and a
mixed batch also trains.  All adapters' rows go at once where they allow it (the grouped kernels, or the torch path's
batched products), else one gather, update and in-place accumulate per adapter.

:class:`MixedBatchRows` is a mixin of :class:`fastlora.LoRALinear`: ``adapted_forward``, ``base_forward``,
``lora_factors``, ``magnitude``, ``lora_bias``, ``_scaled_lora_bias``, ``adapter_settings``, ``adapter_enabled``,
``backend``, ``training``, ``weight``, ``bias`` and ``_frozen_dense_base`` are the layer's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora.segments import (grouped_segments_linear, grouped_segments_low_rank, rows_in_order, segment_low_rank,
                               tokens_per_row)

__all__ = ["MixedBatchRows"]


class MixedBatchRows:
    """One adapter per row of the batch, for a LoRA layer (see the module docstring)."""

    # Whether the base output must be copied before the mixed batch's in-place adds (a quantized base's output).
    CLONE_BASE_OUTPUT = False
    # Set by PeftModel for one forward with ``adapter_names=``: adapter name → the rows of x (dim 0) it takes.
    row_adapters: dict[str, Tensor] | None = None
    row_count: int | None = None  # the mixed batch's number of rows

    def mixed_batch_forward(self, x: Tensor, row_adapters: dict[str, Tensor]) -> Tensor:
        """The base output for every row of x (dim 0), plus for each adapter its update on its own rows
        (``row_adapters``: name → row indices; rows of ``"__base__"``, or of an adapter this layer does not hold,
        get the base output alone); gradients reach each adapter from its rows only, so a mixed batch also trains.
        Every row one adapter's: that adapter's own forward.  Else, where the adapters allow (:meth:`_grouped_rows`),
        every adapter's rows at once: over a frozen dense base in the base product's own autograd node
        (:meth:`grouped_rows_forward`, a batch sorted by adapter read in place), else added to the base output;
        otherwise per adapter one gather of its rows, one update and one in-place accumulate."""
        if self.row_count is not None and x.shape[0] != self.row_count:  # PEFT's check, in every layer
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{self.row_count} and {x.shape[0]} respectively.")
        held = {name: index for name, index in row_adapters.items() if name in self.adapter_settings}
        if self.adapter_enabled and self._one_adapter_for_every_row(x, held):
            return self.adapted_forward(x, list(held))  # that adapter's own forward, its seed drawn alike
        grouped = self._grouped_rows(x, held) if held and self.adapter_enabled else None
        if grouped is not None and self._frozen_dense_base(x):  # the base product takes every adapter's update
            return self.grouped_rows_forward(x, held, grouped)
        result = self.base_forward(x)
        if not self.adapter_enabled:
            return result
        if grouped == "kernels":  # every adapter's rows in one grouped call of the kernels
            return result + self.grouped_rows_update(x, held).view(result.shape).to(result.dtype)
        if self.CLONE_BASE_OUTPUT:
            result = result.clone()
        if grouped == "torch":  # every adapter's rows in one batched call of the torch path
            return self._add_batched_rows_update(result, x, held)
        for name, index in row_adapters.items():
            if name not in self.adapter_settings:
                continue
            index = index.to(x.device)
            # index_put_ with accumulate keeps only the indices for backward (index_add_ would keep the update)
            result.index_put_((index,), self.rows_update(x, index, name).to(result.dtype), accumulate=True)
        return result

    def _one_adapter_for_every_row(self, x: Tensor, held: dict[str, Tensor]) -> bool:
        """Whether one LoRA adapter takes every row of x, in order (a mixed batch of one name)."""
        if len(held) != 1:
            return False
        (name, rows), = held.items()
        return self.magnitude(name) is None and rows_in_order(rows, x.shape[0])

    def _grouped_rows(self, x: Tensor, held: dict[str, Tensor]) -> str | None:
        """How a mixed batch's updates run all at once: "kernels" (on the kernels' schedule within one launch's
        positions: :meth:`grouped_rows_forward` over a frozen dense base, else :meth:`grouped_rows_update`), "torch"
        (the torch path's batched products: :meth:`grouped_rows_forward`, else :meth:`_add_batched_rows_update`), or
        None (one update per adapter, :meth:`rows_update`).  Grouped only for LoRA adapters of one
        dtype without a bias on B, in a layer whose rows' update is the dense one, outside autocast (whose casts
        the per-adapter path follows).  Under ``torch.compile`` never "kernels": the grouped kernels' autograd
        Function is eager code, which the torch path's batched products replace in a traced graph."""
        kernel_dtypes = (torch.float32, torch.float16, torch.bfloat16)
        if type(self).rows_update is not MixedBatchRows.rows_update or x.dtype not in kernel_dtypes:
            return None
        if any(self.magnitude(n) is not None or self.lora_bias(n) is not None
               or self.lora_factors(n)[0].dtype not in kernel_dtypes for n in held):
            return None
        if len({self.lora_factors(n)[0].dtype for n in held}) > 1:
            return None
        from fastlora.functional import _autocast_dtype
        from fastlora.schedules import resolve

        if _autocast_dtype(x.device.type) is not None:
            return None
        if not resolve(self.backend, x).uses_kernels or torch.compiler.is_compiling():
            return "torch"
        from fastlora.kernels.grouped import MAX_POSITIONS

        return "kernels" if sum(len(rows) for rows in held.values()) * tokens_per_row(x) <= MAX_POSITIONS else None

    def _add_batched_rows_update(self, result: Tensor, x: Tensor, held: dict[str, Tensor]) -> Tensor:
        """``result`` plus every adapter's update on its own rows (``held``: name → row indices, disjoint), computed
        as batched products over the adapters (:func:`fastlora.segments.grouped_segments_low_rank`) and
        accumulated at the rows in one indexed add, in place."""
        rows, update = grouped_segments_low_rank(x, *self._segments_arguments(held), self.training)
        # index_put_ with accumulate keeps only the indices for backward (index_add_ would keep the update)
        return result.index_put_((rows,), update.to(result.dtype), accumulate=True)

    def _segments_arguments(self, held: dict[str, Tensor]) -> tuple[list, list, list, list]:
        """The torch path's per-adapter arguments of a mixed batch (:mod:`fastlora.segments`): each adapter's rows,
        (A, B), scaling and dropout p, in ``held``'s order."""
        settings = [self.forward_settings(name) for name in held]
        return (list(held.values()), [self.lora_factors(name) for name in held], [s.scaling for s in settings],
                [s.lora_dropout for s in settings])

    def grouped_rows_forward(self, x: Tensor, held: dict[str, Tensor], grouped: str = "kernels") -> Tensor:
        """x Wᵀ + b with every adapter's update on its own rows (``held`` as :meth:`grouped_rows_update`) taken into
        the base product: one output and one autograd node for the layer, on the kernels
        (:func:`fastlora.grouped_lora.grouped_lora_linear`, the output written once) or, with ``grouped="torch"``,
        the torch path's batched products (:func:`fastlora.segments.grouped_segments_linear`)."""
        if grouped == "torch":
            return grouped_segments_linear(x, self.weight, self.bias, *self._segments_arguments(held), self.training)
        from fastlora.grouped_lora import grouped_lora_linear
        from fastlora.schedules import resolve

        flat = x.reshape(-1, x.shape[-1])
        flat = flat if flat.stride(-1) == 1 else flat.contiguous()
        index, starts, factors, scalings, dropout = self._grouped_segments(x, held)
        schedule = resolve(self.backend, x, self.weight)
        y = grouped_lora_linear(flat, self.weight, self.bias, *factors, starts, scalings, schedule,
                                index=index, dropout=dropout)
        return y.view(*x.shape[:-1], y.shape[-1])

    def grouped_rows_update(self, x: Tensor, held: dict[str, Tensor]) -> Tensor:
        """Every adapter's update on its own rows of x (dim 0; ``held``: name → row indices, disjoint: each row one
        adapter's, as a mixed batch's are), zero on the other rows, in one grouped call
        (:func:`fastlora.grouped_lora.grouped_lora`): each adapter's scaling and dropout (a seed drawn per adapter,
        as one call per adapter would), x read through a token index, never copied.  Shaped (x's elements /
        in_features, out_features), in the adapters' dtype."""
        from fastlora.grouped_lora import grouped_lora

        index, starts, (per_segment_A, per_segment_B), scalings, dropout = self._grouped_segments(x, held)
        return grouped_lora(x.reshape(-1, x.shape[-1]), per_segment_A, per_segment_B, starts, scalings, index=index,
                            dropout=dropout)

    def _grouped_segments(self, x: Tensor, held: dict[str, Tensor]):
        """A mixed batch's segments for the grouped kernels: (the token index, one adapter's tokens after the other;
        the segments' bounds; the factors stacked; the scalings; each adapter's (p, seed), drawn in order)."""
        from fastlora.functional import dropout_and_seed
        from fastlora.grouped_lora import stack_factors

        tokens = tokens_per_row(x)
        within = torch.arange(tokens, device=x.device)
        index = torch.cat([(rows.to(x.device)[:, None] * tokens + within).reshape(-1) for rows in held.values()])
        starts = torch.tensor([0] + [len(rows) * tokens for rows in held.values()], device=x.device).cumsum(0)
        settings = [self.forward_settings(name) for name in held]
        dropout = [dropout_and_seed(s.lora_dropout, self.training, x.device) for s in settings]
        factors = stack_factors([self.lora_factors(name) for name in held])
        return index, starts, factors, [s.scaling for s in settings], dropout

    def rows_update(self, x: Tensor, rows: Tensor, name: str) -> Tensor:
        """Adapter ``name``'s update for the rows ``rows`` of x (dim 0): scaling · ((dropout(x[rows]) Aᵀ) Bᵀ + b_B),
        autograd keeping x itself rather than a copy of the rows (:mod:`fastlora.segments`)."""
        if self.magnitude(name) is not None:
            raise ValueError(f"Cannot pass `adapter_names` when DoRA is enabled.  (adapter {name!r} is a DoRA adapter: "
                             f"a mixed batch takes LoRA adapters only, as in PEFT)")
        lora_A, lora_B = self.lora_factors(name)
        settings = self.forward_settings(name)
        update = segment_low_rank(x, rows, lora_A, lora_B, settings.scaling, settings.lora_dropout, self.training)
        bias = self._scaled_lora_bias(name)
        return update if bias is None else update + bias.to(update.dtype)
