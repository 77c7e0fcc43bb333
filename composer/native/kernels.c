/* Fused CPU kernels for bf16 task arithmetic (composer.native).
 *
 * Each kernel computes, entry by entry, what a sequence of torch operations on bf16 tensors computes:
 * every torch operation on bf16 widens its operands to float32, computes once and rounds the result
 * to bf16 (round to nearest even), so each step below rounds with `round_bf16`, in the same order as
 * the torch path of composer/methods/task_arithmetic.py. Built without -ffast-math and without
 * floating-point contraction, so every float operation is the IEEE single-precision one. NaNs come
 * out as NaN (their payload may differ from torch's).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256
#define MAX_MODELS 16

static inline float widen(uint16_t half) {
    uint32_t bits = (uint32_t)half << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static inline uint16_t round_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return (bits & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : rounded;
}

static inline float rounded(float value) { return widen(round_bf16(value)); }

/* `rounded` for a value whose NaNs have their low 16 bits clear (a NaN stays a NaN, with its own sign and
 * payload): one made by float operations from widened bf16 values and from `quiet` parameters, whose
 * NaNs are theirs or the default NaN. Four vector operations fewer than `rounded`; a NaN reaching an
 * output is made the canonical one there by `round_bf16`. */
static inline float rounded_quiet(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&value, &bits, 4);
    return value;
}

/* A float parameter fit for `rounded_quiet`: a NaN becomes the default one (low 16 bits clear). */
static inline float quiet(float value) { return value != value ? __builtin_nanf("") : value; }

/* A model's delta from the base, x - base rounded to bf16 (torch's bf16 subtraction), and the bit
 * pattern of its magnitude. */
static inline float delta_of(uint16_t model, uint16_t base) { return rounded(widen(model) - widen(base)); }

static inline uint16_t delta_magnitude(uint16_t model, uint16_t base) {
    return round_bf16(widen(model) - widen(base)) & 0x7FFF;
}

/* Entries in the block from `block` on, at most BLOCK, before `stop`. */
static inline int block_length(int64_t block, int64_t stop) { return (int)(stop - block < BLOCK ? stop - block : BLOCK); }

/* A block's entries of a bit mask of the whole tensor (bit p % 8 of byte p / 8; block a multiple of 8)
 * as one byte each, nonzero where the bit is set: each byte's bit k goes to byte k by a multiply. */
static inline void expand_bits(const uint8_t *bits, int64_t block, int length, uint8_t *out) {
    for (int byte = 0; byte < (length + 7) >> 3; byte++) {
        const uint64_t spread = ((uint64_t)bits[(block >> 3) + byte] * 0x0101010101010101ull) & 0x8040201008040201ull;
        memcpy(out + 8 * byte, &spread, 8);
    }
}

/* TIES sign election: the sign of an entry's bf16 sum over models (+ for >= 0), and a delta kept
 * where it has that sign (0 elsewhere; times the sign twice, as torch's mul, relu, mul). */
static inline float elected_sign(float total) { return rounded(total) >= 0.0f ? 1.0f : -1.0f; }

/* `elected_sign` without the rounding: bf16(total) >= 0 exactly when total >= -2^-134 (smaller
 * magnitudes, and the tie at 2^-134, round to -0; a NaN fails both). */
static inline float elected_sign_unrounded(float total) { return total >= -0x1p-134f ? 1.0f : -1.0f; }

static inline float elected(float delta, float sign) {
    const float aligned = delta * sign;
    return (aligned < 0.0f ? 0.0f : aligned) * sign;
}

/* How a model's delta is masked: not at all, by a bit per entry of the whole tensor (bit p % 8 of
 * byte p / 8), by a byte per entry of this range, or by the bit pattern of its magnitude lying in
 * [low, high]. A masked-out entry is multiplied by 0, as torch's delta * mask does. */
enum { KEEP_ALL = 0, KEEP_BITS = 1, KEEP_BYTES = 2, KEEP_PATTERNS = 3 };

/* One model's weighted, masked and scaled delta over one block: stored into `target` (`store`)
 * or added to it (the running sum over models); with `sum` (not NULL), also added to it (the sum the
 * sign is elected from). Masked by patterns, the delta is rounded as torch rounds it (the canonical
 * NaN, whose pattern the window is compared with); otherwise with `rounded_quiet`. */
static inline __attribute__((always_inline)) void model_pass(
    int length, int64_t block, int64_t start, const uint16_t *model, const uint16_t *base, const int mode,
    const uint8_t *data, uint16_t low, uint16_t high, const int scaled, float scale, float weight, const int store,
    float *target, float *sum)
{
    uint8_t expanded[BLOCK];
    float factor[BLOCK];  /* the mask as 0/1 in a local array: the loop below then vectorises (bytes may alias `target`) */
    if (mode == KEEP_BITS || mode == KEEP_BYTES) {
        const uint8_t *bytes = mode == KEEP_BYTES ? data + (block - start) : expanded;
        if (mode == KEEP_BITS)
            expand_bits(data, block, length, expanded);
        for (int j = 0; j < length; j++)
            factor[j] = (float)(bytes[j] != 0);
    }
    for (int j = 0; j < length; j++) {
        float value;
        if (mode == KEEP_PATTERNS) {
            value = delta_of(model[j], base[j]);
            uint32_t bits;
            memcpy(&bits, &value, 4);  /* a bf16 value already: its upper half is its pattern */
            const uint16_t magnitude = (uint16_t)(bits >> 16) & 0x7FFF;
            value = value * (float)(magnitude >= low && magnitude <= high);
        } else {
            value = rounded_quiet(widen(model[j]) - widen(base[j]));
            if (mode == KEEP_BITS || mode == KEEP_BYTES)
                value = value * factor[j];  /* exact: d or a signed 0 (NaN for an infinity), nothing to round */
        }
        if (scaled)
            value = rounded_quiet(value * scale);
        value = rounded_quiet(value * weight);
        if (store)
            target[j] = value;
        else
            target[j] += value;
        if (sum != NULL)
            sum[j] += value;
    }
}

/* out[p] for p in [start, stop) of
 *   d_i = bf16(x_i - base), masked, times scale_i (when has_scale[i]), times weight_i;
 *   consensus: TIES sign election (sign of the bf16 sum, + for >= 0; entries of the other sign
 *   zeroed; kept weight = float32 sum of the weights of the nonzero entries, rounded);
 *   merged = bf16(float32 sum of the d_i); / divisor (normalize: the kept weight, 1 where it is 0,
 *   under consensus, else `divisor`); times lambda (has_lambda); out = bf16(merged + base).
 * Pointers to models and base address the whole flat tensors; `out` too. The sum the sign is elected
 * from is added up as each model's deltas are made; the kept weight is summed only where it divides. */
void task_arithmetic_bf16(
    int64_t start, int64_t stop, int count,
    const uint16_t *base, const uint16_t *const *models,
    const int *keep_modes, const uint8_t *const *keep_data, const uint16_t *keep_low, const uint16_t *keep_high,
    const int *has_scale, const float *scales, const float *weights,
    int consensus, int normalize, float divisor, int has_lambda, float lambda, uint16_t *out)
{
    float deltas[MAX_MODELS][BLOCK];
    float kept_weight[BLOCK], sign[BLOCK], merged[BLOCK];
    float quiet_scales[MAX_MODELS], quiet_weights[MAX_MODELS];
    for (int i = 0; i < count; i++) {
        quiet_scales[i] = quiet(scales[i]);
        quiet_weights[i] = quiet(weights[i]);
    }
    divisor = quiet(divisor);
    lambda = quiet(lambda);
    for (int64_t block = start; block < stop; block += BLOCK) {
        const int length = block_length(block, stop);
        const uint16_t *base_here = base + block;
        for (int j = 0; j < length; j++)
            merged[j] = sign[j] = 0.0f;  /* torch's sums over models start from +0 */
        for (int i = 0; i < count; i++) {
            const int mode = keep_modes[i], variant = (mode << 2) | (has_scale[i] << 1) | (consensus != 0);
            float *target = consensus ? deltas[i] : merged;
            const uint16_t *model = models[i] + block;
            const uint8_t *data = keep_data[i];
            const float scale = quiet_scales[i], weight = quiet_weights[i];
            /* each combination of the flags gets its own loop, so the compiler vectorises each */
#define MODEL_PASS(MODE, SCALED, STORE) \
    case ((MODE) << 2) | ((SCALED) << 1) | (STORE): \
        model_pass(length, block, start, model, base_here, MODE, data, keep_low[i], keep_high[i], SCALED, scale, weight, \
                   STORE, target, (STORE) ? sign : NULL); break;
            switch (variant) {
                MODEL_PASS(KEEP_ALL, 0, 0) MODEL_PASS(KEEP_ALL, 0, 1) MODEL_PASS(KEEP_ALL, 1, 0) MODEL_PASS(KEEP_ALL, 1, 1)
                MODEL_PASS(KEEP_BITS, 0, 0) MODEL_PASS(KEEP_BITS, 0, 1) MODEL_PASS(KEEP_BITS, 1, 0) MODEL_PASS(KEEP_BITS, 1, 1)
                MODEL_PASS(KEEP_BYTES, 0, 0) MODEL_PASS(KEEP_BYTES, 0, 1) MODEL_PASS(KEEP_BYTES, 1, 0) MODEL_PASS(KEEP_BYTES, 1, 1)
                MODEL_PASS(KEEP_PATTERNS, 0, 0) MODEL_PASS(KEEP_PATTERNS, 0, 1) MODEL_PASS(KEEP_PATTERNS, 1, 0) MODEL_PASS(KEEP_PATTERNS, 1, 1)
            }
#undef MODEL_PASS
        }
        if (consensus) {
            for (int j = 0; j < length; j++)
                sign[j] = elected_sign_unrounded(sign[j]);
            if (normalize) {
                for (int j = 0; j < length; j++)
                    kept_weight[j] = 0.0f;
                for (int i = 0; i < count; i++) {
                    const float weight = quiet_weights[i];
                    for (int j = 0; j < length; j++) {
                        const float kept = elected(deltas[i][j], sign[j]);
                        kept_weight[j] += kept != 0.0f ? weight : 0.0f;
                        merged[j] += kept;
                    }
                }
            } else {
                for (int i = 0; i < count; i++)
                    for (int j = 0; j < length; j++)
                        merged[j] += elected(deltas[i][j], sign[j]);
            }
        }
        for (int j = 0; j < length; j++)
            merged[j] = rounded_quiet(merged[j]);
        if (normalize && consensus) {
            for (int j = 0; j < length; j++) {
                const float kept = rounded_quiet(kept_weight[j]);
                const float one_where_zero = (float)(kept == 0.0f);  /* not `?:`, which keeps this loop from vectorising */
                merged[j] = rounded_quiet(merged[j] / rounded_quiet(kept + one_where_zero));
            }
        } else if (normalize) {
            for (int j = 0; j < length; j++)
                merged[j] = rounded_quiet(merged[j] / divisor);
        }
        if (has_lambda)
            for (int j = 0; j < length; j++)
                merged[j] = rounded_quiet(merged[j] * lambda);
        uint16_t *out_here = out + block;
        for (int j = 0; j < length; j++)
            out_here[j] = round_bf16(merged[j] + widen(base_here[j]));
    }
}

/* splitmix64 (Steele, Lea & Flood 2014) word `index` of the stream of `key`. */
static inline uint64_t stream_word(uint64_t key, uint64_t index) {
    uint64_t z = key + (index + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Exact sums of bf16 magnitudes: sums[s] (s >= 1) counts units of 2^(s - 134), so the sum is
 * sum_s sums[s] * 2^(s - 134) (a bf16 magnitude of biased exponent e and integer significand m is
 * m * 2^(max(e, 1) - 134)); sums[INF_SLOT] counts infinities and sums[NAN_SLOT] NaNs. A slot that
 * nears 2^62 carries into the next (worth twice as much), so no slot overflows. */
#define VALUE_SLOTS 318
#define INF_SLOT 318
#define NAN_SLOT 319
#define SPAN_LIMIT 37  /* 2^(8 + 37) * BLOCK = 2^53 */
#define NARROW_SPAN 23  /* 2^(8 + 23) = 2^31 */
#define WORD_SPAN 16  /* BLOCK * 2^(8 + 16) = 2^32 */

static inline void add_to_slot(int64_t *sums, int slot, int64_t amount) {
    sums[slot] += amount;
    while (sums[slot] >= (INT64_C(1) << 61) && slot + 1 < VALUE_SLOTS) {
        sums[slot + 1] += sums[slot] >> 1;
        sums[slot] &= 1;
        slot++;
    }
}

static void add_magnitude(int64_t *sums, uint16_t magnitude) {
    const int exponent = magnitude >> 7, fraction = magnitude & 0x7F;
    if (exponent == 255)
        sums[fraction ? NAN_SLOT : INF_SLOT] += 1;
    else if (magnitude)
        add_to_slot(sums, exponent ? exponent : 1, fraction | (exponent ? 0x80 : 0));
}

/* A finite bf16 magnitude (bit pattern) as a count of units of 2^(unit - 134), in 32 bits: for blocks whose span
 * keeps every count below 2^32 (`WORD_SPAN`, `NARROW_SPAN`); 0 for a zero magnitude. */
static inline uint32_t units_of(uint32_t magnitude, int unit) {
    const uint32_t exponent = magnitude >> 7;
    const uint32_t significand = (magnitude & 0x7Fu) | (exponent ? 0x80u : 0u);
    const int shift = (int)(exponent ? exponent : 1u) - unit;
    return significand << (shift < 0 ? 0 : shift);
}

/* The span of a block's magnitudes (bit patterns, sign cleared) as `add_magnitudes_spanned` takes it: the
 * largest pattern, and the smallest nonzero one less 1 (0xFFFF when there is none), tracked with
 * `track_span` as the magnitudes are made, so no loop goes over them for it alone. */
static inline void track_span(unsigned magnitude, unsigned *high, unsigned *low) {
    const unsigned less = (magnitude - 1u) & 0xFFFFu;  /* 0 -> 0xFFFF */
    *high = magnitude > *high ? magnitude : *high;
    *low = less < *low ? less : *low;
}

/* Add the magnitudes of one block to `sums`, and those whose `keep` byte is nonzero to `kept_sums`
 * (when `keep` is not NULL), given the block's span (`track_span`). A dropped infinity or NaN adds a
 * NaN to `kept_sums` (0 times it is NaN, as the masked delta holds). Where the nonzero exponents
 * span at most SPAN_LIMIT, each magnitude is an integer number of units of the smallest exponent
 * below 2^45, and the block's total below 2^53, so the block is summed in integers (vectorised) and
 * added to one slot: in 32-bit lanes where the span is at most WORD_SPAN (each amount below 2^24,
 * the block's total below 2^32), else in 64-bit ones; otherwise, or with an infinity or NaN, value
 * by value. */
static void add_magnitudes_spanned(
    int64_t *sums, int64_t *kept_sums, const uint16_t *magnitudes, const uint8_t *keep, int length, unsigned high, unsigned low)
{
    if (high == 0)
        return;
    const int top = (int)(high >> 7), bottom = (int)((low + 1u) >> 7), unit = bottom ? bottom : 1;
    if (top == 255 || top - bottom > SPAN_LIMIT) {
        for (int j = 0; j < length; j++) {
            add_magnitude(sums, magnitudes[j]);
            if (keep != NULL) {
                add_magnitude(kept_sums, keep[j] ? magnitudes[j] : 0);
                kept_sums[NAN_SLOT] += (keep[j] == 0) & (magnitudes[j] >= 0x7F80);
            }
        }
        return;
    }
    if (top - bottom <= WORD_SPAN) {  /* totals below 2^32: no widening to 64-bit lanes */
        uint32_t total = 0, kept_total = 0;
        for (int j = 0; j < length; j++) {
            const uint32_t amount = units_of(magnitudes[j], unit);
            total += amount;
            if (keep != NULL)
                kept_total += amount & -(uint32_t)(keep[j] != 0);
        }
        add_to_slot(sums, unit, (int64_t)total);
        if (keep != NULL)
            add_to_slot(kept_sums, unit, (int64_t)kept_total);
        return;
    }
    if (top - bottom <= NARROW_SPAN) {  /* each amount below 2^31: computed in 32-bit lanes, twice as many a vector */
        uint64_t total = 0, kept_total = 0;
        for (int j = 0; j < length; j++) {
            const uint32_t amount = units_of(magnitudes[j], unit);
            total += amount;
            if (keep != NULL)
                kept_total += keep[j] ? amount : 0u;
        }
        add_to_slot(sums, unit, (int64_t)total);
        if (keep != NULL)
            add_to_slot(kept_sums, unit, (int64_t)kept_total);
        return;
    }
    int64_t total = 0, kept_total = 0;
    for (int j = 0; j < length; j++) {
        const int magnitude = magnitudes[j], exponent = magnitude >> 7;
        const int64_t significand = (magnitude & 0x7F) | (exponent ? 0x80 : 0);
        const int shift = (exponent ? exponent : 1) - unit;
        const int64_t amount = magnitude ? significand << (shift < 0 ? 0 : shift) : 0;
        total += amount;
        if (keep != NULL)
            kept_total += keep[j] ? amount : 0;
    }
    add_to_slot(sums, unit, total);
    if (keep != NULL)
        add_to_slot(kept_sums, unit, kept_total);
}

/* `add_magnitudes_spanned` of a block whose span is not known yet. */
static void add_magnitudes_kept(int64_t *sums, int64_t *kept_sums, const uint16_t *magnitudes, const uint8_t *keep, int length) {
    unsigned high = 0, low = 0xFFFF;
    for (int j = 0; j < length; j++)
        track_span(magnitudes[j], &high, &low);
    add_magnitudes_spanned(sums, kept_sums, magnitudes, keep, length, high, low);
}

/* `add_magnitudes_kept` without the kept sums. */
static void add_magnitudes(int64_t *sums, const uint16_t *magnitudes, int length) {
    add_magnitudes_kept(sums, NULL, magnitudes, NULL, length);
}

/* The bit pattern of the magnitude of bf16(x - base) in a 32-bit lane, where it is only summed: a NaN
 * difference is not made the canonical NaN (the NaNs of a difference of widened bf16 values have their
 * low 16 bits clear, so rounding leaves them NaN, and a sum only counts them). */
static inline uint32_t delta_magnitude_lane(uint16_t model, uint16_t base) {
    uint32_t bits;
    const float difference = widen(model) - widen(base);
    memcpy(&bits, &difference, 4);
    return ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16) & 0x7FFFu;
}

/* DARE's exact sums over one block of the magnitudes `magnitudes` (`delta_magnitude_lane`, span
 * `high`, `low` as `track_span` gives it), all of them into `before` and those whose draw in `levels`
 * is below `threshold` into `after`; a dropped infinity or NaN adds a NaN to `after`. In 32-bit
 * lanes where the span allows (almost every block of real task vectors), else by
 * `add_magnitudes_spanned`. */
static void add_dare_magnitudes(
    int64_t *before, int64_t *after, const uint32_t *magnitudes, const int16_t *levels, int threshold, int length,
    unsigned high, unsigned low)
{
    if (high == 0)
        return;
    const int top = (int)(high >> 7), bottom = (int)((low + 1u) >> 7), unit = bottom ? bottom : 1;
    if (top == 255 || top - bottom > WORD_SPAN) {
        uint16_t narrow[BLOCK];
        uint8_t keep[BLOCK];
        for (int j = 0; j < length; j++) {
            narrow[j] = (uint16_t)magnitudes[j];
            keep[j] = levels[j] < threshold;
        }
        add_magnitudes_spanned(before, after, narrow, keep, length, high, low);
        return;
    }
    uint32_t total = 0, kept_total = 0;  /* below 2^32: see add_magnitudes_spanned */
    for (int j = 0; j < length; j++) {
        const uint32_t amount = units_of(magnitudes[j], unit);
        total += amount;
        kept_total += amount & -(uint32_t)((int)levels[j] < threshold);
    }
    add_to_slot(before, unit, (int64_t)total);
    add_to_slot(after, unit, (int64_t)kept_total);
}

/* DARE's first pass over [start, stop) of one model (start a multiple of BLOCK): keep bits drawn
 * from the stream of `key` (entry p is 16-bit lane p % 4 of word p / 4, as a signed integer, kept
 * when below `threshold`) written to `bits` (the whole tensor's, bit p % 8 of byte p / 8); with
 * `before` and `after` (else NULL), the exact sums (`add_magnitudes_spanned`) of the magnitudes of the
 * delta bf16(x - base) and of the delta times its keep mask (0 times an infinity or NaN is NaN). A
 * block's magnitudes and their span come out of one loop, in 32-bit lanes throughout. */
void dare_select_bf16(
    int64_t start, int64_t stop, uint64_t key, int threshold, uint8_t *bits,
    const uint16_t *model, const uint16_t *base, int64_t *before, int64_t *after)
{
    uint32_t magnitudes[BLOCK];
    uint8_t expanded[BLOCK];
    uint64_t words[BLOCK / 4];
    for (int64_t block = start; block < stop; block += BLOCK) {
        const int length = block_length(block, stop);
        for (int w = 0; w < (length + 3) / 4; w++)
            words[w] = stream_word(key, (uint64_t)((block >> 2) + w));
        const int16_t *levels = (const int16_t *)words;  /* little-endian: entry p is lane p % 4 of word p / 4 */
        for (int j = 0; j < length; j++)
            expanded[j] = levels[j] < threshold;
        for (int j = length; j < ((length + 7) & ~7); j++)
            expanded[j] = 0;
        for (int byte = 0; byte < (length + 7) >> 3; byte++) {
            uint64_t flags;  /* eight 0/1 bytes: their bits gathered into the top byte of the product */
            memcpy(&flags, expanded + 8 * byte, 8);
            bits[(block >> 3) + byte] = (uint8_t)((flags * 0x0102040810204080ull) >> 56);
        }
        if (before == NULL)
            continue;
        const uint16_t *model_here = model + block, *base_here = base + block;
        unsigned high = 0, low = 0xFFFF;
        for (int j = 0; j < length; j++) {
            const uint32_t magnitude = delta_magnitude_lane(model_here[j], base_here[j]);
            magnitudes[j] = magnitude;
            track_span(magnitude, &high, &low);
        }
        add_dare_magnitudes(before, after, magnitudes, levels, threshold, length, high, low);
    }
}

/* The exact sums (`add_magnitudes`) of the magnitudes of the bf16 values in [0, count). */
void magnitude_sums_bf16(int64_t count, const uint16_t *values, int64_t *sums) {
    uint16_t magnitudes[BLOCK];
    for (int64_t block = 0; block < count; block += BLOCK) {
        const int length = block_length(block, count);
        for (int j = 0; j < length; j++)
            magnitudes[j] = values[block + j] & 0x7FFF;
        add_magnitudes(sums, magnitudes, length);
    }
}

/* DELLA's first pass over `rows` rows of `width` entries (the model's and base's pointers at the
 * first row, which is at flat position `offset`): within each row the entry of rank r (magnitudes
 * of the delta bf16(x - base) ascending, equal ones by position: a counting sort of their bit
 * patterns) is kept when the draw at flat position offset + row * width + r is below
 * thresholds[r]; `keep` gets a byte per entry (1 kept). With `before` and `after` (else NULL), the
 * exact sums of the delta's magnitudes and of the masked delta's, as in `dare_select_bf16`. */
void della_select_bf16(
    int64_t rows, int64_t width, int64_t offset, uint64_t key, const int32_t *thresholds, uint8_t *keep,
    const uint16_t *model, const uint16_t *base, int64_t *before, int64_t *after)
{
    uint16_t *magnitudes = malloc((size_t)width * sizeof(uint16_t));
    int32_t *counters = malloc(0x8000 * sizeof(int32_t));
    uint64_t *draws = malloc((size_t)(width / 4 + 2) * sizeof(uint64_t));
    uint8_t *kept_by_rank = malloc((size_t)width);
    for (int64_t row = 0; row < rows; row++) {
        const uint16_t *model_row = model + row * width, *base_row = base + row * width;
        uint8_t *keep_row = keep + row * width;
        /* Ranks by a counting sort of the 15-bit patterns: counters only for the patterns between
         * the row's smallest and largest nonzero one (and 0), so a row costs about its length. */
        for (int64_t j = 0; j < width; j++)
            magnitudes[j] = delta_magnitude(model_row[j], base_row[j]);
        uint16_t lowest = 0x7FFF, highest = 0;
        for (int64_t j = 0; j < width; j++) {
            const uint16_t magnitude = magnitudes[j], below_nonzero = (uint16_t)(magnitude - 1);  /* 0 -> 0xFFFF */
            lowest = below_nonzero < lowest ? below_nonzero : lowest;
            highest = magnitude > highest ? magnitude : highest;
        }
        lowest++;  /* the smallest nonzero pattern (0x8000 when there is none: an empty range below) */
        counters[0] = 0;
        for (unsigned pattern = lowest; pattern <= highest; pattern++)
            counters[pattern] = 0;
        for (int64_t j = 0; j < width; j++)
            counters[magnitudes[j]]++;
        int32_t below = counters[0];
        counters[0] = 0;
        for (unsigned pattern = lowest; pattern <= highest; pattern++) {
            const int32_t count = counters[pattern];
            counters[pattern] = below;
            below += count;
        }
        /* the row's draws, a word (four draws) at a time from the word holding its first position */
        const int64_t first = offset + row * width, first_word = first >> 2, words = ((first + width + 3) >> 2) - first_word;
        for (int64_t w = 0; w < words; w++)
            draws[w] = stream_word(key, (uint64_t)(first_word + w));
        const int16_t *levels = (const int16_t *)draws + (first & 3);  /* little-endian lanes */
        for (int64_t rank = 0; rank < width; rank++)
            kept_by_rank[rank] = levels[rank] < thresholds[rank];
        for (int64_t j = 0; j < width; j++)
            keep_row[j] = kept_by_rank[counters[magnitudes[j]]++];  /* equal patterns ranked by position */
        if (before == NULL)
            continue;
        for (int64_t block = 0; block < width; block += BLOCK) {
            const int length = block_length(block, width);
            add_magnitudes_kept(before, after, magnitudes + block, keep_row + block, length);
        }
    }
    free(magnitudes);
    free(counters);
    free(draws);
    free(kept_by_rank);
}

/* Model Stock's blend over [start, stop): average = bf16 sum of the models, one at a time, divided by
 * their count; out = bf16(bf16(average * ratio) + bf16(keep * base)), keep being bf16(1 - ratio). */
void model_stock_blend_bf16(
    int64_t start, int64_t stop, int count, const uint16_t *const *models, const uint16_t *base,
    float ratio, float keep, uint16_t *out)
{
    float average[BLOCK];
    for (int64_t block = start; block < stop; block += BLOCK) {
        const int length = block_length(block, stop);
        const uint16_t *first = models[0] + block, *second = models[1] + block;
        for (int j = 0; j < length; j++)
            average[j] = rounded(widen(first[j]) + widen(second[j]));
        for (int i = 2; i < count; i++) {
            const uint16_t *model = models[i] + block;
            for (int j = 0; j < length; j++)
                average[j] = rounded(average[j] + widen(model[j]));
        }
        const float divisor = (float)count;
        const uint16_t *base_here = base + block;
        uint16_t *out_here = out + block;
        for (int j = 0; j < length; j++)
            out_here[j] = round_bf16(rounded(rounded(average[j] / divisor) * ratio) + rounded(keep * widen(base_here[j])));
    }
}

/* SCE's variance across models of the deltas bf16(x_k - base) over [start, stop) into `out` (from
 * out[0]): the float64 Welford recurrence of composer.methods.task_arithmetic.population_variance,
 * mean += d / (k + 1) and m2 += d (x - mean) with d = x - mean before the update, then m2 / count
 * rounded to float32 and to bf16. */
void sce_variances_bf16(int64_t start, int64_t stop, int count, const uint16_t *base, const uint16_t *const *models, uint16_t *out) {
    double mean[BLOCK], m2[BLOCK];
    float deltas[BLOCK];
    for (int64_t block = start; block < stop; block += BLOCK) {
        const int length = block_length(block, stop);
        const uint16_t *base_here = base + block;
        for (int j = 0; j < length; j++)
            mean[j] = m2[j] = 0.0;
        for (int k = 0; k < count; k++) {
            const uint16_t *model = models[k] + block;
            const double seen = (double)(k + 1);
            for (int j = 0; j < length; j++)
                deltas[j] = delta_of(model[j], base_here[j]);
            if (((k + 1) & k) == 0) {  /* a power of two: dividing by it is multiplying by its inverse, exactly */
                const double inverse = 1.0 / seen;
                for (int j = 0; j < length; j++) {
                    const double x = (double)deltas[j];
                    const double d = x - mean[j];
                    mean[j] = mean[j] + d * inverse;
                    m2[j] = m2[j] + d * (x - mean[j]);
                }
            } else {
                for (int j = 0; j < length; j++) {
                    const double x = (double)deltas[j];
                    const double d = x - mean[j];
                    mean[j] = mean[j] + d / seen;
                    m2[j] = m2[j] + d * (x - mean[j]);
                }
            }
        }
        for (int j = 0; j < length; j++)
            out[block - start + j] = round_bf16((float)(m2[j] / (double)count));
    }
}

/* The exact sums (`add_magnitudes`) of the squares bf16(d * d) of one model's deltas
 * d = bf16(x - base) over [start, stop), each times its keep byte (from keep[0]; all kept when NULL). */
void sce_square_sums_bf16(int64_t start, int64_t stop, const uint16_t *model, const uint16_t *base, const uint8_t *keep, int64_t *sums) {
    uint16_t squares[BLOCK];
    for (int64_t block = start; block < stop; block += BLOCK) {
        const int length = block_length(block, stop);
        for (int j = 0; j < length; j++) {
            float delta = delta_of(model[block + j], base[block + j]);
            if (keep != NULL)
                delta = delta * (float)(keep[block - start + j] != 0);
            squares[j] = round_bf16(delta * delta) & 0x7FFF;
        }
        add_magnitudes(sums, squares, length);
    }
}

/* SCE's merge over [start, stop): d_i = bf16(x_i - base), times its selection bit (`bits`, the whole
 * tensor's, when not NULL); TIES sign election on the unweighted d_i (the kept weight: the float32
 * sum of weights[i] over the nonzero elected d_i, rounded); merged = bf16 sum of bf16(d_i * w_i),
 * divided by the kept weight clamped below at 1e-6; out = bf16(merged + base). */
void sce_merge_bf16(
    int64_t start, int64_t stop, int count, const uint16_t *base, const uint16_t *const *models,
    const uint8_t *bits, const float *weights, uint16_t *out)
{
    float deltas[MAX_MODELS][BLOCK];
    float sign[BLOCK], kept_weight[BLOCK], merged[BLOCK];
    uint8_t expanded[BLOCK];
    for (int64_t block = start; block < stop; block += BLOCK) {
        const int length = block_length(block, stop);
        const uint16_t *base_here = base + block;
        if (bits != NULL)
            expand_bits(bits, block, length, expanded);
        for (int j = 0; j < length; j++)
            sign[j] = kept_weight[j] = merged[j] = 0.0f;
        for (int i = 0; i < count; i++) {
            const uint16_t *model = models[i] + block;
            float *delta = deltas[i];
            for (int j = 0; j < length; j++)
                delta[j] = delta_of(model[j], base_here[j]);
            if (bits != NULL)
                for (int j = 0; j < length; j++)
                    delta[j] = delta[j] * (float)(expanded[j] != 0);
            for (int j = 0; j < length; j++)
                sign[j] += delta[j];
        }
        for (int j = 0; j < length; j++)
            sign[j] = elected_sign(sign[j]);
        for (int i = 0; i < count; i++) {
            const float weight = weights[i];
            for (int j = 0; j < length; j++) {
                const float kept = elected(deltas[i][j], sign[j]);
                kept_weight[j] += kept != 0.0f ? weight : 0.0f;
                merged[j] += rounded(kept * weight);
            }
        }
        uint16_t *out_here = out + block;
        for (int j = 0; j < length; j++) {
            const float kept = rounded(kept_weight[j]);
            const float divisor = rounded(kept < 1e-6f ? 1e-6f : kept);
            out_here[j] = round_bf16(rounded(rounded(merged[j]) / divisor) + widen(base_here[j]));
        }
    }
}

/* How many of the deltas bf16(x - base) over [start, stop) have each magnitude bit pattern, added to
 * counts[0 .. 32767] (int64); counted in two interleaved copies, so that runs of one pattern do not
 * wait on one counter. */
void delta_pattern_counts_bf16(int64_t start, int64_t stop, const uint16_t *model, const uint16_t *base, int64_t *counts) {
    int32_t *copies = calloc(2 * 0x8000, sizeof(int32_t));
    uint16_t magnitudes[BLOCK];
    for (int64_t block = start; block < stop; block += BLOCK) {
        const int length = block_length(block, stop);
        for (int j = 0; j < length; j++)
            magnitudes[j] = delta_magnitude(model[block + j], base[block + j]);
        for (int j = 0; j < length; j++)
            copies[((j & 1) << 15) | magnitudes[j]]++;
    }
    for (int pattern = 0; pattern < 0x8000; pattern++)
        counts[pattern] += copies[pattern] + copies[0x8000 | pattern];
    free(copies);
}

/* The position in [start, stop) of the nth (1-based) delta bf16(x - base) whose magnitude has bit pattern `pattern`,
 * into *position (-1 when the range holds fewer): where a magnitude window that splits a tie at its threshold stops
 * keeping the tie's entries (ties are kept lowest position first). Each block is counted first and scanned only
 * when it holds the nth. */
void nth_delta_pattern_bf16(int64_t start, int64_t stop, const uint16_t *model, const uint16_t *base, uint16_t pattern, int64_t nth, int64_t *position) {
    *position = -1;
    for (int64_t block = start; block < stop && nth > 0; block += BLOCK) {
        const int length = block_length(block, stop);
        int found = 0;
        for (int j = 0; j < length; j++)
            found += delta_magnitude(model[block + j], base[block + j]) == pattern;
        if (found < nth) {
            nth -= found;
            continue;
        }
        for (int j = 0; j < length; j++)
            if (delta_magnitude(model[block + j], base[block + j]) == pattern && --nth == 0) {
                *position = block + j;
                return;
            }
    }
}

/* One pass over a tensor's bytes as they are written, for the resume journal and the check for NaN and
 * infinity. The checksum: the bytes as little-endian 64-bit words (the last one zero-padded), cut into
 * blocks of SCAN_BLOCK bytes; sums[0] = the sum of all words, sums[1] = the sum over blocks of the running
 * sums[0] at each block's end (both mod 2^64), so a block's words count with its place. `nonfinite` counts
 * the entries whose exponent bits (`exponent`, an entry being `width` bytes: 2, 4 or 8) are all set, which
 * are NaN or infinite; width 0: not floating point, nothing counted. Each block is read from cache by the
 * second loop. */
#define SCAN_BLOCK 4096

static inline uint64_t block_word_sum(const uint8_t *block, int64_t length) {
    uint64_t total = 0;
    int64_t offset = 0;
    for (; offset + 8 <= length; offset += 8) {
        uint64_t word;
        memcpy(&word, block + offset, 8);
        total += word;
    }
    if (offset < length) {
        uint64_t word = 0;
        memcpy(&word, block + offset, (size_t)(length - offset));
        total += word;
    }
    return total;
}

static inline int64_t block_nonfinite(const uint8_t *block, int64_t length, int width, uint64_t exponent) {
    int64_t found = 0;
    if (width == 2) {
        const uint16_t mask = (uint16_t)exponent;
        for (int64_t at = 0; at < length / 2; at++) {
            uint16_t value;
            memcpy(&value, block + 2 * at, 2);
            found += (value & mask) == mask;
        }
    } else if (width == 4) {
        const uint32_t mask = (uint32_t)exponent;
        for (int64_t at = 0; at < length / 4; at++) {
            uint32_t value;
            memcpy(&value, block + 4 * at, 4);
            found += (value & mask) == mask;
        }
    } else if (width == 8) {
        for (int64_t at = 0; at < length / 8; at++) {
            uint64_t value;
            memcpy(&value, block + 8 * at, 8);
            found += (value & exponent) == exponent;
        }
    }
    return found;
}

void scan_bytes(int64_t nbytes, const uint8_t *data, int width, uint64_t exponent, uint64_t *sums, int64_t *nonfinite) {
    uint64_t first = 0, second = 0;
    int64_t found = 0;
    for (int64_t start = 0; start < nbytes; start += SCAN_BLOCK) {
        const int64_t length = nbytes - start < SCAN_BLOCK ? nbytes - start : SCAN_BLOCK;
        first += block_word_sum(data + start, length);
        second += first;
        found += block_nonfinite(data + start, length, width, exponent);
    }
    sums[0] = first;
    sums[1] = second;
    *nonfinite = found;
}
