// Causal multi-head self-attention on the packed qkv activations (rows, 3*n_embd), forward and backward.
// One invocation per (batch, head, query row) owns that row of the probability matrix, so no barriers.
// Forward keeps the softmax probabilities (batch, head, seq, seq) for the backward pass.
// Vectors are read as vec4s along head_dim, which must be a multiple of 4.

struct AttentionDims {
  batch: u32,
  seq: u32,
  n_head: u32,
  head_dim: u32,
  n_embd: u32,
  pad0: u32,
  pad1: u32,
  pad2: u32,
}

@group(0) @binding(0) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> probs: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;  // forward: y (rows, n_embd); backward: d_qkv
@group(0) @binding(3) var<storage, read> grad_y: array<vec4<f32>>;     // backward: dL/dy (rows, n_embd)
@group(0) @binding(4) var<storage, read_write> grad_scores: array<f32>; // backward: dL/d(scaled scores)
@group(0) @binding(5) var<storage, read> dims: AttentionDims;

struct Row {
  b: u32,
  h: u32,
  i: u32,
  prob_base: u32,  // start of this (b, h, i) row in probs / grad_scores
}

fn row_of(index: u32) -> Row {
  let i = index % dims.seq;
  let bh = index / dims.seq;
  return Row(bh / dims.n_head, bh % dims.n_head, i, (bh * dims.seq + i) * dims.seq);
}

// vec4 index of head h's part of q (part 0), k (1) or v (2) at sequence position t of batch b.
fn qkv_at(b: u32, t: u32, part: u32, h: u32) -> u32 {
  return ((b * dims.seq + t) * 3u * dims.n_embd + part * dims.n_embd + h * dims.head_dim) / 4u;
}

fn y_at(b: u32, t: u32, h: u32) -> u32 {
  return ((b * dims.seq + t) * dims.n_embd + h * dims.head_dim) / 4u;
}

fn dot_rows(a: u32, b: u32) -> f32 {
  var s = 0.0;
  for (var c = 0u; c < dims.head_dim / 4u; c++) { s += dot(qkv[a + c], qkv[b + c]); }
  return s;
}

@compute @workgroup_size(64)
fn attention_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= dims.batch * dims.n_head * dims.seq) { return; }
  let r = row_of(gid.x);
  let scale = 1.0 / sqrt(f32(dims.head_dim));
  let q = qkv_at(r.b, r.i, 0u, r.h);
  var row_max = -3.0e38;
  for (var j = 0u; j <= r.i; j++) {
    let s = dot_rows(q, qkv_at(r.b, j, 1u, r.h)) * scale;
    probs[r.prob_base + j] = s;
    row_max = max(row_max, s);
  }
  var total = 0.0;
  for (var j = 0u; j <= r.i; j++) {
    let e = exp(probs[r.prob_base + j] - row_max);
    probs[r.prob_base + j] = e;
    total += e;
  }
  let inv_total = 1.0 / total;
  for (var j = 0u; j <= r.i; j++) { probs[r.prob_base + j] *= inv_total; }
  // The masked future stays exactly zero so the backward pass may read whole rows.
  for (var j = r.i + 1u; j < dims.seq; j++) { probs[r.prob_base + j] = 0.0; }
  let y = y_at(r.b, r.i, r.h);
  let v0 = qkv_at(r.b, 0u, 2u, r.h);
  let v_stride = 3u * dims.n_embd / 4u;
  for (var c = 0u; c < dims.head_dim / 4u; c++) {
    var acc = vec4<f32>(0.0);
    for (var j = 0u; j <= r.i; j++) { acc += probs[r.prob_base + j] * qkv[v0 + j * v_stride + c]; }
    out[y + c] = acc;
  }
}

// Per query row i: dP_ij = dy_i . v_j, dS_ij = P_ij (dP_ij - sum_j P_ij dP_ij), dq_i = scale * sum_j dS_ij k_j.
@compute @workgroup_size(64)
fn attention_backward_query(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= dims.batch * dims.n_head * dims.seq) { return; }
  let r = row_of(gid.x);
  let scale = 1.0 / sqrt(f32(dims.head_dim));
  let head4 = dims.head_dim / 4u;
  let stride = 3u * dims.n_embd / 4u;
  let dy = y_at(r.b, r.i, r.h);
  let v0 = qkv_at(r.b, 0u, 2u, r.h);
  var p_dot_dp = 0.0;
  for (var j = 0u; j <= r.i; j++) {
    var dp = 0.0;
    for (var c = 0u; c < head4; c++) { dp += dot(grad_y[dy + c], qkv[v0 + j * stride + c]); }
    grad_scores[r.prob_base + j] = dp;
    p_dot_dp += probs[r.prob_base + j] * dp;
  }
  for (var j = 0u; j <= r.i; j++) {
    let p = probs[r.prob_base + j];
    grad_scores[r.prob_base + j] = p * (grad_scores[r.prob_base + j] - p_dot_dp);
  }
  for (var j = r.i + 1u; j < dims.seq; j++) { grad_scores[r.prob_base + j] = 0.0; }
  let dq = qkv_at(r.b, r.i, 0u, r.h);
  let k0 = qkv_at(r.b, 0u, 1u, r.h);
  for (var c = 0u; c < head4; c++) {
    var acc = vec4<f32>(0.0);
    for (var j = 0u; j <= r.i; j++) { acc += grad_scores[r.prob_base + j] * qkv[k0 + j * stride + c]; }
    out[dq + c] = acc * scale;
  }
}

// Per key row j (run after attention_backward_query): dk_j = scale * sum_i dS_ij q_i, dv_j = sum_i P_ij dy_i.
@compute @workgroup_size(64)
fn attention_backward_key_value(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= dims.batch * dims.n_head * dims.seq) { return; }
  let r = row_of(gid.x);
  let j = r.i;
  let scale = 1.0 / sqrt(f32(dims.head_dim));
  let head4 = dims.head_dim / 4u;
  let stride = 3u * dims.n_embd / 4u;
  let y_stride = dims.n_embd / 4u;
  let bh_base = r.prob_base - j * dims.seq;  // start of this (b, h) probability matrix
  let q0 = qkv_at(r.b, 0u, 0u, r.h);
  let dy0 = y_at(r.b, 0u, r.h);
  let dk = qkv_at(r.b, j, 1u, r.h);
  let dv = qkv_at(r.b, j, 2u, r.h);
  for (var c = 0u; c < head4; c++) {
    var acc_k = vec4<f32>(0.0);
    var acc_v = vec4<f32>(0.0);
    for (var i = j; i < dims.seq; i++) {
      let at = bh_base + i * dims.seq + j;
      acc_k += grad_scores[at] * qkv[q0 + i * stride + c];
      acc_v += probs[at] * grad_y[dy0 + i * y_stride + c];
    }
    out[dk + c] = acc_k * scale;
    out[dv + c] = acc_v;
  }
}
