// The op catalogue: every pypeft schema, in one place. Kernels register
// against these names in cpu/ and cuda/; the Python face (pypeft/ops/) adds
// fake (meta) kernels and autograd. Forward and backward are both ops so that
// a Python-free TorchScript runtime can run them and torch.compile can trace
// the autograd formula.
#include <torch/library.h>

TORCH_LIBRARY(pypeft, m) {
  // y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ, and u = drop(x) Aᵀ, saved for backward.
  // drop() keeps element (row, col) by a counter hash of (seed, row, col) and
  // scales kept ones by 1 / (1 - dropout_p); seed: 0-dim int64 tensor, needed
  // when dropout_p > 0.
  // An NF4 base (QLoRA; here and in every linear op below that takes
  // weight_absmax): weight_absmax given, weight holds uint8 NF4 codes [out, in / 2]
  // and weight_absmax float32 one scale per weight_blocksize values
  // (nf4_quantize's); the frozen products run tile by tile of W's rows
  // (pypeft/nf4_linear.h), and a gradient for such a weight is refused.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, float dropout_p, Tensor? seed, Tensor? weight_absmax=None, "
      "int weight_blocksize=64) -> (Tensor y, Tensor u)");
  // Gradients of lora_linear for (x, weight, bias, lora_a, lora_b), each computed
  // only where output_mask says so (an undefined tensor / None otherwise).
  // grad_u, the gradient flowing into the auxiliary output u, may be None.
  // row_ids (int64, one per row of x, as counter_dropout's): row i's dropout
  // mask is that of row row_ids[i], for rows gathered out of a larger x.
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor? grad_u, Tensor x, Tensor weight, "
      "Tensor lora_a, Tensor lora_b, Tensor u, float scale, float dropout_p, Tensor? seed, "
      "bool[5] output_mask, Tensor? row_ids=None, Tensor? weight_absmax=None, "
      "int weight_blocksize=64) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_lora_a, Tensor grad_lora_b)");

  // VeRA: y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_sᵀ)) B_sᵀ), u = drop(x) A_sᵀ, where
  // A [r, max_in] and B [max_out, r] are frozen matrices shared by every layer,
  // sliced to A_s = A[:, :in], B_s = B[:out, :]. Dropout as in lora_linear.
  m.def(
      "vera_linear(Tensor x, Tensor weight, Tensor? bias, Tensor vera_a, Tensor vera_b, "
      "Tensor lambda_d, Tensor lambda_b, float dropout_p, Tensor? seed, "
      "Tensor? weight_absmax=None, int weight_blocksize=64) -> (Tensor y, Tensor u)");
  // Gradients for (x, weight, bias, lambda_d, lambda_b) where output_mask says;
  // row_ids as in lora_linear_backward.
  m.def(
      "vera_linear_backward(Tensor grad_out, Tensor? grad_u, Tensor x, Tensor weight, "
      "Tensor vera_a, Tensor vera_b, Tensor lambda_d, Tensor lambda_b, Tensor u, float dropout_p, "
      "Tensor? seed, bool[5] output_mask, Tensor? row_ids=None, Tensor? weight_absmax=None, "
      "int weight_blocksize=64) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_lambda_d, Tensor grad_lambda_b)");

  // Mixed-adapter batches (inference only; no backward op): each batch row b of
  // x [B, ..., in] runs with its own adapter k = row_adapter[b], or with none
  // when k == -1, whose rows equal torch.nn.functional.linear bit for bit.
  // LoRA: K adapters of their own ranks, y[b] += scale[k] · (x[b] A_kᵀ) B_kᵀ.
  m.def(
      "lora_linear_mixed(Tensor x, Tensor weight, Tensor? bias, Tensor[] lora_a, "
      "Tensor[] lora_b, float[] scale, SymInt[] row_adapter, Tensor? weight_absmax=None, "
      "int weight_blocksize=64) -> Tensor");
  // VeRA: the shared A, B sliced as in vera_linear; λ_d [K, r] and λ_b [K, out]
  // stack the K adapters' vectors: y[b] += λ_b[k] ⊙ ((λ_d[k] ⊙ (x[b] A_sᵀ)) B_sᵀ).
  m.def(
      "vera_linear_mixed(Tensor x, Tensor weight, Tensor? bias, Tensor vera_a, Tensor vera_b, "
      "Tensor lambda_d, Tensor lambda_b, SymInt[] row_adapter, Tensor? weight_absmax=None, "
      "int weight_blocksize=64) -> Tensor");

  // The counter-hash dropout mask on its own: x viewed as [rows, C] (C = its
  // last dim); row i is masked as global row row_ids[i] (or i when row_ids is
  // None), so a subset of rows gathered out of a larger tensor is masked as it
  // was there. Kept elements are scaled by 1 / (1 - p).
  m.def("counter_dropout(Tensor x, float p, Tensor? seed, Tensor? row_ids) -> Tensor");

  // TokenTune: token-subset ops. positions [B, k] (int64; per batch row
  // distinct, in [0, T)) name the tokens whose computations stay
  // differentiable; x's leading dims are [B, T]. Forward computes every token
  // exactly as the plain op does. Backward: grad_x is zero at every unselected
  // token and parameter gradients sum over the selected tokens only, i.e. the
  // unselected tokens' computations are constants. Saved for backward: the
  // selected tokens' rows (returned as *_rows so the autograd layer can share
  // one copy between several ops reading the same x).
  m.def(
      "token_subset_linear(Tensor x, Tensor weight, Tensor? bias, Tensor positions, "
      "Tensor? weight_absmax=None, int weight_blocksize=64) -> (Tensor y, Tensor x_rows)");
  // x_rows is read only for grad_weight (pass an empty [0] tensor otherwise).
  m.def(
      "token_subset_linear_backward(Tensor grad_y, Tensor x_rows, Tensor weight, "
      "Tensor positions, bool[3] output_mask, Tensor? weight_absmax=None, "
      "int weight_blocksize=64) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // With a LoRA / VeRA adapter (as lora_linear / vera_linear, dropout mask keyed
  // by the flat row b * T + t of x, so forward and backward agree). x_rows is
  // needed in backward only for grad_lora_a or grad_weight; VeRA needs it only
  // for grad_weight (pass an empty [0] tensor otherwise).
  m.def(
      "token_subset_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
      "Tensor lora_b, float scale, float dropout_p, Tensor? seed, Tensor positions, "
      "Tensor? weight_absmax=None, int weight_blocksize=64) "
      "-> (Tensor y, Tensor x_rows, Tensor u_rows)");
  m.def(
      "token_subset_lora_linear_backward(Tensor grad_y, Tensor x_rows, Tensor weight, "
      "Tensor lora_a, Tensor lora_b, Tensor u_rows, float scale, float dropout_p, Tensor? seed, "
      "Tensor positions, bool[5] output_mask, Tensor? weight_absmax=None, "
      "int weight_blocksize=64) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_lora_a, Tensor grad_lora_b)");
  m.def(
      "token_subset_vera_linear(Tensor x, Tensor weight, Tensor? bias, Tensor vera_a, "
      "Tensor vera_b, Tensor lambda_d, Tensor lambda_b, float dropout_p, Tensor? seed, "
      "Tensor positions, Tensor? weight_absmax=None, int weight_blocksize=64) "
      "-> (Tensor y, Tensor x_rows, Tensor u_rows)");
  m.def(
      "token_subset_vera_linear_backward(Tensor grad_y, Tensor x_rows, Tensor weight, "
      "Tensor vera_a, Tensor vera_b, Tensor lambda_d, Tensor lambda_b, Tensor u_rows, "
      "float dropout_p, Tensor? seed, Tensor positions, bool[5] output_mask, "
      "Tensor? weight_absmax=None, int weight_blocksize=64) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_lambda_d, Tensor grad_lambda_b)");
  // Norms over the last dim. layer_norm as torch.nn.functional.layer_norm;
  // rms_norm as transformers' Llama/Mistral/Qwen2 RMSNorm: normalised in
  // float32, cast back to x's dtype, then times weight.
  m.def(
      "token_subset_layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, "
      "Tensor positions) -> (Tensor y, Tensor x_rows)");
  m.def(
      "token_subset_layer_norm_backward(Tensor grad_y, Tensor x_rows, Tensor? weight, "
      "Tensor? bias, float eps, Tensor positions, bool[3] output_mask) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "token_subset_rms_norm(Tensor x, Tensor? weight, float eps, Tensor positions) "
      "-> (Tensor y, Tensor x_rows)");
  m.def(
      "token_subset_rms_norm_backward(Tensor grad_y, Tensor x_rows, Tensor? weight, float eps, "
      "Tensor positions, bool[2] output_mask) -> (Tensor grad_x, Tensor grad_weight)");
  // Elementwise activations, kind: "gelu" (erf), "gelu_tanh", "silu", "relu";
  // the gated one is act(gate) * up (Llama's SwiGLU with kind "silu").
  m.def(
      "token_subset_activation(Tensor x, str kind, Tensor positions) -> (Tensor y, Tensor x_rows)");
  m.def(
      "token_subset_activation_backward(Tensor grad_y, Tensor x_rows, str kind, "
      "Tensor positions) -> Tensor");
  m.def(
      "token_subset_gated_activation(Tensor gate, Tensor up, str kind, Tensor positions) "
      "-> (Tensor y, Tensor gate_rows, Tensor up_rows)");
  m.def(
      "token_subset_gated_activation_backward(Tensor grad_y, Tensor gate_rows, Tensor up_rows, "
      "str kind, Tensor positions, bool[2] output_mask) -> (Tensor grad_gate, Tensor grad_up)");
  // Dropout with counter_dropout's mask, x viewed as [B * T, features]: saves
  // nothing but the seed. With p = 0 it is the identity whose gradient keeps
  // only the selected tokens (where the token-subset region begins).
  m.def("token_subset_dropout(Tensor x, float p, Tensor? seed, Tensor positions) -> Tensor");
  m.def(
      "token_subset_dropout_backward(Tensor grad_y, float p, Tensor? seed, Tensor positions) "
      "-> Tensor");
  // Attention, softmax(q kᵀ · scale + mask) v per head, with the layout of
  // transformers' attention interface: query [B, Hq, T, D], key [B, Hkv, S, D],
  // value [B, Hkv, S, Dv], Hq a multiple of Hkv (grouped K/V heads). positions
  // index query tokens (dim 2). attn_mask: None, bool (True = attend) or
  // additive float, broadcastable to [B, Hq, T, S]; is_causal adds the causal
  // mask as torch's scaled_dot_product_attention does (query t sees keys <= t). Dropout on the probabilities uses
  // counter_dropout's mask with row (b * Hq + h) * T + t and column s.
  // Saved: the selected queries, all keys and values (a selected query
  // attends to every token), the mask. grad_key / grad_value cover all key
  // tokens (what selected queries send them); grad_query is zero at unselected
  // tokens.
  m.def(
      "token_subset_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "float scale, bool is_causal, float dropout_p, Tensor? seed, Tensor positions) "
      "-> (Tensor out, Tensor query_rows)");
  m.def(
      "token_subset_attention_backward(Tensor grad_out, Tensor query_rows, Tensor key, "
      "Tensor value, Tensor? attn_mask, float scale, bool is_causal, float dropout_p, "
      "Tensor? seed, Tensor positions, bool[3] output_mask) -> (Tensor grad_query, "
      "Tensor grad_key, Tensor grad_value)");
  // READ: recurrent cells and a scan over a sequence (csrc/recurrent_scan.cpp).
  // Cells as torch.nn.RNNCell (tanh) / GRUCell (gates r, z, n;
  // n = tanh(gi_n + r ⊙ (W_hn h + b_hn))) / LSTMCell (gates i, f, g, o), with
  // G = 1, 3, 4 gates: x [N, in], h, c [N, H], w_ih [G·H, in], w_hh [G·H, H],
  // biases [G·H]. One dtype for all (float32, float64, bfloat16; float16 on
  // CUDA); bfloat16 / float16 do the gate math in float.
  m.def(
      "rnn_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> Tensor");
  m.def(
      "gru_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> Tensor");
  m.def(
      "lstm_cell(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor h_out, Tensor c_out)");
  // cell: "rnn", "gru" or "lstm"; c and grad_c for lstm only (grad_c None:
  // zero). Gradients of (x, h, c, w_ih, w_hh, b_ih, b_hh) where output_mask
  // says and the input exists (undefined / None otherwise).
  m.def(
      "recurrent_cell_backward(Tensor grad_h, Tensor? grad_c, Tensor x, Tensor h, Tensor? c, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, str cell, bool[7] output_mask) "
      "-> (Tensor grad_x, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh)");
  // hs [L, N, H]: the hidden state after each step, hs[t] = cell(xs[t], hs[t-1]),
  // hs[-1] = h0 (c0 likewise, lstm only: required then, rejected otherwise).
  // xs [L, N, in], any L >= 0, N >= 0. The cell states are not returned (backward
  // recomputes them); nothing of size L·N·G·H is kept.
  m.def(
      "recurrent_scan(Tensor xs, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, str cell) -> Tensor hs");
  // Gradients of (xs, h0, c0, w_ih, w_hh, b_ih, b_hh) where output_mask says.
  // Rows of grad_hs that are zero at every step are skipped (they contribute
  // nothing): their grad_xs / grad_h0 / grad_c0 rows are zero.
  m.def(
      "recurrent_scan_backward(Tensor grad_hs, Tensor xs, Tensor hs, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, str cell, bool[7] output_mask) "
      "-> (Tensor grad_xs, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh)");

  // Bottleneck adapters (Houlsby / Pfeiffer / parallel), the `adapters`
  // library's Adapter block: z [..., d], residual [..., d] or None (zero),
  // w_down [m, d], b_down [m], w_up [d, m], b_up [d],
  //   p = z W_downᵀ + b_down,  out = residual + drop(scale · (act(p) W_upᵀ + b_up)).
  // drop() is counter_dropout's mask over out viewed as [N, d], kept elements
  // scaled by 1 / (1 - dropout_p); seed: 0-dim int64, needed when dropout_p > 0.
  // activation: "relu", "silu", "gelu" (erf), "gelu_tanh", "tanh", "sigmoid",
  // "leaky_relu" (slope 0.01), "identity". p [..., m] is returned and saved
  // for backward (with z): nothing else of size N·d.
  m.def(
      "bottleneck_adapter(Tensor z, Tensor? residual, Tensor w_down, Tensor? b_down, "
      "Tensor w_up, Tensor? b_up, float scale, str activation, float dropout_p, Tensor? seed) "
      "-> (Tensor out, Tensor p)");
  // Gradients for (z, w_down, b_down, w_up, b_up) where output_mask says (the
  // biases' in w_down's dtype); residual's is grad_out itself, so it is not an
  // output. grad_p, the gradient flowing into the auxiliary output p, may be None.
  m.def(
      "bottleneck_adapter_backward(Tensor grad_out, Tensor? grad_p, Tensor z, Tensor p, "
      "Tensor w_down, Tensor w_up, float scale, str activation, float dropout_p, Tensor? seed, "
      "bool[5] output_mask) -> (Tensor grad_z, Tensor grad_w_down, Tensor grad_b_down, "
      "Tensor grad_w_up, Tensor grad_b_up)");
  // AdapterFusion over N bottleneck adapters (csrc/include/pypeft/adapter_fusion.h
  // has the math): z, query, residual [..., d]; w_down [N, m, d], b_down [N, m],
  // w_up [N, d, m], b_up [N, d], scales: N floats; activation: 'relu', 'silu',
  // 'gelu', 'gelu_tanh', 'tanh', 'sigmoid', 'leaky_relu', 'identity'; w_query,
  // w_key, w_value [d, d] (w_value None: no value projection). Dropout on the
  // [rows, N] scores before the division by temperature, with counter_dropout's
  // mask (row, adapter). Returns out [..., d], the bottleneck pre-activations
  // pre_act [..., N, m] and the fusion probabilities probs [..., N], the two
  // saved for backward (nothing of size N·d per row exists).
  m.def(
      "adapter_fusion(Tensor z, Tensor query, Tensor? residual, Tensor w_down, Tensor b_down, "
      "Tensor w_up, Tensor b_up, float[] scales, str activation, Tensor w_query, Tensor? b_query, "
      "Tensor w_key, Tensor? b_key, Tensor? w_value, float temperature, float dropout_p, "
      "Tensor? seed) -> (Tensor out, Tensor pre_act, Tensor probs)");
  // Gradients of (z, query, residual, w_down, b_down, w_up, b_up, w_query, b_query,
  // w_key, b_key, w_value) where output_mask says (the residual's: a copy of grad_out).
  // grad_pre_act, grad_probs: what flowed into the auxiliary outputs, or None.
  m.def(
      "adapter_fusion_backward(Tensor grad_out, Tensor? grad_pre_act, Tensor? grad_probs, "
      "Tensor z, Tensor query, Tensor pre_act, Tensor probs, Tensor w_down, Tensor w_up, "
      "Tensor b_up, float[] scales, str activation, Tensor w_query, Tensor? b_query, "
      "Tensor w_key, Tensor? b_key, Tensor? w_value, float temperature, float dropout_p, "
      "Tensor? seed, bool[12] output_mask) -> (Tensor grad_z, Tensor grad_query, "
      "Tensor grad_residual, Tensor grad_w_down, Tensor grad_b_down, Tensor grad_w_up, Tensor grad_b_up, "
      "Tensor grad_w_query, Tensor grad_b_query, Tensor grad_w_key, Tensor grad_b_key, "
      "Tensor grad_w_value)");

  // NF4 (QLoRA's 4-bit NormalFloat), bit-exact with bitsandbytes (pypeft/nf4.h).
  // w: any shape; codes: uint8 [ceil(numel / 2)], two per byte in w's flattened
  // order, the first in the high nibble; absmax: float32, one per block of
  // `blocksize` (even) values. Not differentiable: quantisation is a storage step.
  m.def("nf4_quantize(Tensor w, int blocksize) -> (Tensor codes, Tensor absmax)");
  // codes, absmax as nf4_quantize's -> values of `shape` in `dtype`.
  m.def(
      "nf4_dequantize(Tensor codes, Tensor absmax, int blocksize, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");
  // 8-bit blockwise quantisation on a 256-value code map (bitsandbytes' dynamic
  // map for NF4's double quantisation): codes uint8 of x's shape, absmax float32
  // one per block; dequantisation returns float32.
  m.def("quantize_blockwise_8bit(Tensor x, Tensor code, int blocksize) -> (Tensor codes, Tensor absmax)");
  m.def("dequantize_blockwise_8bit(Tensor codes, Tensor absmax, Tensor code, int blocksize) -> Tensor");
  // y = x deq(W)ᵀ + b over an NF4 weight: weight uint8 [out, in / 2] (rows of
  // in codes), absmax float32 [ceil(out * in / blocksize)]; x, bias, y in the
  // compute dtype. Tile by tile of W's rows (pypeft/nf4_linear.h): W in full
  // precision never exists. Saved for backward: nothing but the weight itself.
  m.def(
      "nf4_linear(Tensor x, Tensor weight, Tensor absmax, int blocksize, Tensor? bias) -> Tensor");
  // Gradients of (x, bias) where output_mask says; W is frozen.
  m.def(
      "nf4_linear_backward(Tensor grad_y, Tensor weight, Tensor absmax, int blocksize, "
      "bool[2] output_mask) -> (Tensor grad_x, Tensor grad_bias)");
}
