// Token + position embedding, forward and backward. Tokens arrive packed little-endian, token_bits wide: bytes
// (4 per u32) for a vocabulary of at most 256, uint16 (2 per u32) above it (shared/tokens.py).
// The wte gradient is a scatter-add; one invocation per (vocab row, column) scans all tokens in order,
// so the sum never depends on scheduling (no atomics, bit-for-bit reproducible).

struct EmbeddingDims {
  rows: u32,        // batch * seq
  seq: u32,
  n_embd: u32,
  vocab: u32,
  block_size: u32,
  wte_offset: u32,  // in floats
  wpe_offset: u32,
  token_bits: u32,  // 16 for uint16 ids; 8 (or 0, as callers from before BPE write) for bytes
}

@group(0) @binding(0) var<storage, read> tokens: array<u32>;
@group(0) @binding(1) var<storage, read> params: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> grad_x: array<vec4<f32>>;  // (rows, n_embd) as vec4s
@group(0) @binding(4) var<storage, read> dims: EmbeddingDims;

fn token_at(n: u32) -> u32 {
  let bits = select(8u, dims.token_bits, dims.token_bits == 16u);
  let per_word = 32u / bits;
  return (tokens[n / per_word] >> (bits * (n % per_word))) & ((1u << bits) - 1u);
}

// x[n, c] = wte[token n, c] + wpe[n mod seq, c]
@compute @workgroup_size(256)
fn embed_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i >= dims.rows * dims.n_embd) { return; }
  let n = i / dims.n_embd;
  let c = i % dims.n_embd;
  let tok = token_at(n);
  out[i] = params[dims.wte_offset + tok * dims.n_embd + c] + params[dims.wpe_offset + (n % dims.seq) * dims.n_embd + c];
}

const WTE_CHUNK4: u32 = 16u;  // columns (in vec4s) one invocation accumulates while it scans the tokens

// out is the gradient vector; writes every wte entry, zero for tokens that do not occur. Scanning the tokens
// is the cost here, so each invocation scans them once for a whole chunk of 64 columns. The grid is
// kernels/device.py's grid_for (a large vocabulary can need more than 65535 workgroups along x).
@compute @workgroup_size(64)
fn embed_backward_wte(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
  let cols4 = dims.n_embd / 4u;
  let chunks = (cols4 + WTE_CHUNK4 - 1u) / WTE_CHUNK4;
  let i = gid.y * groups.x * 64u + gid.x;
  if (i >= dims.vocab * chunks) { return; }
  let v = i / chunks;
  let first4 = (i % chunks) * WTE_CHUNK4;
  let width4 = min(WTE_CHUNK4, cols4 - first4);
  var acc: array<vec4<f32>, 16>;
  for (var k = 0u; k < WTE_CHUNK4; k++) { acc[k] = vec4<f32>(0.0); }
  for (var n = 0u; n < dims.rows; n++) {
    if (token_at(n) == v) {
      let row = (n * dims.n_embd) / 4u + first4;
      for (var k = 0u; k < width4; k++) { acc[k] += grad_x[row + k]; }
    }
  }
  let out_row = dims.wte_offset + v * dims.n_embd + first4 * 4u;
  for (var k = 0u; k < width4; k++) {
    let o = out_row + 4u * k;
    out[o] = acc[k].x;
    out[o + 1u] = acc[k].y;
    out[o + 2u] = acc[k].z;
    out[o + 3u] = acc[k].w;
  }
}

// Writes every wpe entry: positions at or past seq get zero, as torch gives them.
@compute @workgroup_size(256)
fn embed_backward_wpe(@builtin(global_invocation_id) gid: vec3<u32>) {
  let i = gid.x;
  if (i >= dims.block_size * dims.n_embd) { return; }
  let t = i / dims.n_embd;
  let c = i % dims.n_embd;
  var acc = 0.0;
  if (t < dims.seq) {
    for (var n = t; n < dims.rows; n += dims.seq) {
      let at = n * dims.n_embd + c;
      acc += grad_x[at / 4u][at % 4u];
    }
  }
  out[dims.wpe_offset + i] = acc;
}
