// Causal self-attention for one new token over a key/value cache: the decode step of generation.
// One invocation per head appends that head's key and value at `position`, then attends over 0..position,
// so no invocation reads what another writes and no barrier is needed.
// Vectors are read as vec4s along head_dim, which must be a multiple of 4.

struct DecodeDims {
  position: u32,   // the new token's position; the cache holds positions 0..position-1 before this dispatch
  n_head: u32,
  head_dim: u32,
  n_embd: u32,
  block_size: u32, // rows of the cache and of each head's score row
  pad0: u32,
  pad1: u32,
  pad2: u32,
}

@group(0) @binding(0) var<storage, read> qkv: array<vec4<f32>>;             // the new token's q, k, v (3 * n_embd)
@group(0) @binding(1) var<storage, read_write> cache: array<vec4<f32>>;     // (block_size, 2, n_embd): k then v
@group(0) @binding(2) var<storage, read_write> scores: array<f32>;          // (n_head, block_size) scratch
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;       // y (n_embd)
@group(0) @binding(4) var<storage, read> dims: DecodeDims;

// vec4 index of head h's key (part 0) or value (part 1) at position t in the cache.
fn cache_at(t: u32, part: u32, h: u32) -> u32 {
  return ((t * 2u + part) * dims.n_embd + h * dims.head_dim) / 4u;
}

@compute @workgroup_size(64)
fn attention_decode(@builtin(global_invocation_id) gid: vec3<u32>) {
  let h = gid.x;
  if (h >= dims.n_head) { return; }
  let head4 = dims.head_dim / 4u;
  let q = (h * dims.head_dim) / 4u;
  let k_new = (dims.n_embd + h * dims.head_dim) / 4u;
  let v_new = (2u * dims.n_embd + h * dims.head_dim) / 4u;
  let p = dims.position;
  for (var c = 0u; c < head4; c++) {
    cache[cache_at(p, 0u, h) + c] = qkv[k_new + c];
    cache[cache_at(p, 1u, h) + c] = qkv[v_new + c];
  }
  // softmax(q . k_j / sqrt(head_dim)) in float32, as attention.wgsl's forward computes one query row
  let scale = 1.0 / sqrt(f32(dims.head_dim));
  let base = h * dims.block_size;
  var row_max = -3.0e38;
  for (var j = 0u; j <= p; j++) {
    var s = 0.0;
    let k = cache_at(j, 0u, h);
    for (var c = 0u; c < head4; c++) { s += dot(qkv[q + c], cache[k + c]); }
    s *= scale;
    scores[base + j] = s;
    row_max = max(row_max, s);
  }
  var total = 0.0;
  for (var j = 0u; j <= p; j++) {
    let e = exp(scores[base + j] - row_max);
    scores[base + j] = e;
    total += e;
  }
  let inv_total = 1.0 / total;
  let y = (h * dims.head_dim) / 4u;
  for (var c = 0u; c < head4; c++) {
    var acc = vec4<f32>(0.0);
    for (var j = 0u; j <= p; j++) { acc += (scores[base + j] * inv_total) * cache[cache_at(j, 1u, h) + c]; }
    out[y + c] = acc;
  }
}
