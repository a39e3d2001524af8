// SparseLoCo's chunked top-k with 2-bit values (the rule: shared/compress.py's docstring), with error feedback, on
// the device: `sparseloco_select` ranks one chunk per workgroup, writes its levels, its sent values' offsets and
// codes, and the new residual; `sparseloco_pack` packs offsets and codes into the wire's bitstreams.
// Every choice is made on float bit patterns (integers), so that the bytes equal the Python, numpy and torch
// encoders'; the only float arithmetic is the residual's, the same f32 operations as shared.compress.ErrorFeedback.

struct Dims {
  count: u32,        // n
  chunk: u32,        // C, at most WORKGROUP * MAX_PER_THREAD
  k: u32,            // K
  index_bits: u32,   // b: the width of an offset within its chunk
  chunks: u32,
  selected: u32,     // S: the values sent, chunk after chunk
  per_thread: u32,   // ceil(C / WORKGROUP): each invocation ranks this many consecutive values of its chunk
  level_words: u32,  // 2 * chunks: the levels come first in `payload`, then the offsets' words
  index_words: u32,  // ceil(S * b / 32)
  code_words: u32,   // ceil(S / 16)
  status_word: u32,  // where `sparseloco_pack` copies the first non-finite index (0xffffffff: none)
  pad: u32,
}

@group(0) @binding(0) var<storage, read> minuend: array<f32>;
@group(0) @binding(1) var<storage, read> subtrahend: array<f32>;
@group(0) @binding(2) var<storage, read> residual_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> residual_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> slots: array<u32>;    // per sent value: offset | code << 16
@group(0) @binding(5) var<storage, read_write> payload: array<u32>;  // levels, offsets, codes, status
@group(0) @binding(6) var<storage, read_write> status: array<atomic<u32>>;  // [first non-finite index]
@group(0) @binding(7) var<storage, read> dims: Dims;
@group(0) @binding(8) var<storage, read> status_value: array<u32>;  // `status` again, for the pack pass

const WORKGROUP: u32 = 256u;
const MAX_PER_THREAD: u32 = 16u;  // shared/compress.py MAX_SPARSELOCO_CHUNK = 4096 = WORKGROUP * 16
const MAGNITUDE: u32 = 0x7fffffffu;
const EXPONENT: u32 = 0x7f800000u;
const KEY_BITS: u32 = 31u;  // a magnitude's bit pattern orders it among finite floats

// counts[4 * bit + j]: how many magnitudes reach search j's candidate at `bit`; then the two counts "above".
var<workgroup> counts: array<atomic<u32>, 128>;
var<workgroup> scan: array<u32, 256>;

// The sum of `value` over the invocations before `lid` (Hillis-Steele). Call from uniform control flow.
fn exclusive_scan(lid: u32, value: u32) -> u32 {
  scan[lid] = value;
  workgroupBarrier();
  for (var stride = 1u; stride < WORKGROUP; stride <<= 1u) {
    var add = 0u;
    if (lid >= stride) { add = scan[lid - stride]; }
    workgroupBarrier();
    scan[lid] += add;
    workgroupBarrier();
  }
  return scan[lid] - value;
}

@compute @workgroup_size(256)
fn sparseloco_select(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
  let chunk = wid.y * groups.x + wid.x;
  if (chunk >= dims.chunks) { return; }  // the whole workgroup: barriers below stay uniform
  let start = chunk * dims.chunk;
  let length = min(dims.chunk, dims.count - start);
  let kept = min(dims.k, length);
  let high = kept / 2u;
  // The rank each search finds the magnitude of (1-based): the last value sent, the last high one, and the values
  // whose magnitudes are the levels (shared.compress.sparseloco_ranks).
  let ranks = vec4<u32>(kept, high, high / 2u + 1u, high + (kept - high) / 2u + 1u);
  let first = lid * dims.per_thread;  // this invocation's first offset in the chunk
  let mine = min(dims.per_thread, max(length, first) - first);  // how many of its values exist

  var corrected: array<f32, MAX_PER_THREAD>;
  var keys: array<u32, MAX_PER_THREAD>;
  for (var e = 0u; e < mine; e++) {
    let i = start + first + e;
    let x = (minuend[i] - subtrahend[i]) + residual_in[i];  // the pseudo-gradient, then its residual added
    corrected[e] = x;
    let bits = bitcast<u32>(x);
    if ((bits & EXPONENT) == EXPONENT) { atomicMin(&status[0], i); }
    keys[e] = bits & MAGNITUDE;
  }
  for (var j = lid; j < 128u; j += WORKGROUP) { atomicStore(&counts[j], 0u); }
  workgroupBarrier();

  // Four binary searches on the magnitude's bits, side by side: threshold = the largest t with at least `rank`
  // magnitudes >= t, which is the rank-th largest magnitude.
  var threshold = vec4<u32>(0u);
  for (var bit = KEY_BITS; bit > 0u; bit--) {
    let b = bit - 1u;
    let candidate = threshold | vec4<u32>(1u << b);
    var reached = vec4<u32>(0u);
    for (var e = 0u; e < mine; e++) {
      reached += select(vec4<u32>(0u), vec4<u32>(1u), vec4<u32>(keys[e]) >= candidate);
    }
    atomicAdd(&counts[4u * b], reached.x);
    atomicAdd(&counts[4u * b + 1u], reached.y);
    atomicAdd(&counts[4u * b + 2u], reached.z);
    atomicAdd(&counts[4u * b + 3u], reached.w);
    workgroupBarrier();
    let total = vec4<u32>(atomicLoad(&counts[4u * b]), atomicLoad(&counts[4u * b + 1u]),
                          atomicLoad(&counts[4u * b + 2u]), atomicLoad(&counts[4u * b + 3u]));
    threshold = select(threshold, candidate, total >= ranks);
  }

  // Magnitudes above a threshold are in; of those equal to it, the ones at the lowest offsets fill what is left.
  var above = vec2<u32>(0u);
  var equal = vec2<u32>(0u);
  for (var e = 0u; e < mine; e++) {
    above += select(vec2<u32>(0u), vec2<u32>(1u), vec2<u32>(keys[e]) > threshold.xy);
    equal += select(vec2<u32>(0u), vec2<u32>(1u), vec2<u32>(keys[e]) == threshold.xy);
  }
  atomicAdd(&counts[124], above.x);
  atomicAdd(&counts[125], above.y);
  let equal_before = exclusive_scan(lid, equal.x | (equal.y << 16u));  // counts <= 4096 fit 16 bits each
  let room = ranks.xy - vec2<u32>(atomicLoad(&counts[124]), atomicLoad(&counts[125]));
  var seen = vec2<u32>(equal_before & 0xffffu, equal_before >> 16u);

  var sent_mask = 0u;
  var high_mask = 0u;
  for (var e = 0u; e < mine; e++) {
    var is_sent = keys[e] > threshold.x;
    if (keys[e] == threshold.x) { is_sent = seen.x < room.x; seen.x += 1u; }
    var is_high = keys[e] > threshold.y;
    if (keys[e] == threshold.y) { is_high = seen.y < room.y; seen.y += 1u; }
    sent_mask |= u32(is_sent) << e;
    high_mask |= u32(is_high) << e;
  }
  var position = chunk * dims.k + exclusive_scan(lid, countOneBits(sent_mask));

  let hi = bitcast<f32>(threshold.z);
  let lo = bitcast<f32>(threshold.w);
  for (var e = 0u; e < mine; e++) {
    var decoded = 0.0;
    if (((sent_mask >> e) & 1u) == 1u) {
      let is_high = ((high_mask >> e) & 1u) == 1u;
      let negative = corrected[e] < 0.0;
      let level = select(lo, hi, is_high);
      decoded = select(level, -level, negative);
      slots[position] = (first + e) | ((u32(negative) | (u32(is_high) << 1u)) << 16u);
      position += 1u;
    }
    residual_out[start + first + e] = corrected[e] - decoded;
  }
  if (lid == 0u) {
    payload[2u * chunk] = threshold.z;
    payload[2u * chunk + 1u] = threshold.w;
  }
}

// One invocation per payload word after the levels: offsets (b bits each), then codes (2 bits each), LSB first.
@compute @workgroup_size(256)
fn sparseloco_pack(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
  let w = gid.y * groups.x * WORKGROUP + gid.x;
  if (w == 0u) { payload[dims.status_word] = status_value[0]; }
  if (w < dims.index_words) {
    let first_bit = 32u * w;
    var word = 0u;
    for (var j = first_bit / dims.index_bits; j < dims.selected; j++) {
      let bit = j * dims.index_bits;
      if (bit >= first_bit + 32u) { break; }
      let offset = slots[j] & 0xffffu;
      if (bit >= first_bit) { word |= offset << (bit - first_bit); } else { word |= offset >> (first_bit - bit); }
    }
    payload[dims.level_words + w] = word;
  } else if (w < dims.index_words + dims.code_words) {
    let c = w - dims.index_words;
    var word = 0u;
    for (var e = 0u; e < 16u; e++) {
      let j = 16u * c + e;
      if (j < dims.selected) { word |= (slots[j] >> 16u) << (2u * e); }
    }
    payload[dims.level_words + w] = word;
  }
}
