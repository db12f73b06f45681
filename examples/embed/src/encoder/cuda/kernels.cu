// The small kernels of the CUDA encoder, compiled at run time with NVRTC (no headers: only
// built-in device functions). Activations are token-major: row r of a [rows][n] buffer holds
// the n features of word piece r. Every kernel takes its sizes as arguments and touches no
// element past them; the host checks the buffers against the same sizes before each launch.
//
// Block-per-row kernels (layer_norm, softmax, pool, l2_normalize) assume blockDim.x is a power
// of two no larger than BLOCK.

#define BLOCK 256

// Sum of v over the block; every thread gets the result. `red` holds BLOCK floats.
__device__ float block_sum(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            red[threadIdx.x] += red[threadIdx.x + s];
        }
        __syncthreads();
    }
    float total = red[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
        }
        __syncthreads();
    }
    float total = red[0];
    __syncthreads();
    return total;
}

// x[r][f] = word[ids[r]][f] + position[pos[r]][f] + token_type[types[r]][f], for rows * hidden
// elements. tokens holds three arrays of `rows` entries: ids, type ids, positions.
extern "C" __global__ void embed(float* x, const unsigned int* tokens, const float* word,
                                 const float* position, const float* token_type,
                                 unsigned int rows, unsigned int hidden) {
    unsigned long long n = (unsigned long long)rows * hidden;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long r = i / hidden;
        unsigned long long f = i % hidden;
        unsigned long long id = tokens[r];
        unsigned long long ty = tokens[rows + r];
        unsigned long long pos = tokens[2ull * rows + r];
        x[i] = word[id * hidden + f] + position[pos * hidden + f] + token_type[ty * hidden + f];
    }
}

// y[r][c] += b[c] for rows * cols elements; with gelu != 0, then y = y * Phi(y) (erf form).
extern "C" __global__ void add_bias(float* y, const float* b, unsigned int rows,
                                    unsigned int cols, int gelu) {
    unsigned long long n = (unsigned long long)rows * cols;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = y[i] + b[i % cols];
        if (gelu) {
            v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        }
        y[i] = v;
    }
}

// One block per row: x[r] = LayerNorm(x[r] + y[r]) * w + b (y may be null: no residual).
// Biased variance, eps inside the root, as torch.
extern "C" __global__ void layer_norm(float* x, const float* y, const float* w, const float* b,
                                      unsigned int rows, unsigned int hidden, float eps) {
    __shared__ float red[BLOCK];
    unsigned int r = blockIdx.x;
    if (r >= rows) {
        return;
    }
    float* row = x + (unsigned long long)r * hidden;
    const float* res = y ? y + (unsigned long long)r * hidden : 0;
    float sum = 0.0f;
    for (unsigned int f = threadIdx.x; f < hidden; f += blockDim.x) {
        float v = row[f] + (res ? res[f] : 0.0f);
        row[f] = v;
        sum += v;
    }
    float mean = block_sum(sum, red) / hidden;
    float sq = 0.0f;
    for (unsigned int f = threadIdx.x; f < hidden; f += blockDim.x) {
        float d = row[f] - mean;
        sq += d * d;
    }
    float inv_std = rsqrtf(block_sum(sq, red) / hidden + eps);
    for (unsigned int f = threadIdx.x; f < hidden; f += blockDim.x) {
        row[f] = (row[f] - mean) * inv_std * w[f] + b[f];
    }
}

// One block per row of `len` scores: a numerically stable softmax in place.
extern "C" __global__ void softmax(float* s, unsigned int nrows, unsigned int len) {
    __shared__ float red[BLOCK];
    unsigned int r = blockIdx.x;
    if (r >= nrows) {
        return;
    }
    float* row = s + (unsigned long long)r * len;
    float m = -3.402823466e38f;
    for (unsigned int j = threadIdx.x; j < len; j += blockDim.x) {
        m = fmaxf(m, row[j]);
    }
    m = block_max(m, red);
    float sum = 0.0f;
    for (unsigned int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = expf(row[j] - m);
        row[j] = e;
        sum += e;
    }
    float inv = 1.0f / block_sum(sum, red);
    for (unsigned int j = threadIdx.x; j < len; j += blockDim.x) {
        row[j] *= inv;
    }
}

// One block per text: out[t][f] pools rows spans[t] .. spans[t] + spans[texts + t] of x.
// mode: 0 mean, 1 first token (CLS), 2 max, 3 sum / sqrt(len).
extern "C" __global__ void pool(float* out, const float* x, const unsigned int* spans,
                                unsigned int texts, unsigned int hidden, int mode) {
    unsigned int t = blockIdx.x;
    if (t >= texts) {
        return;
    }
    unsigned long long start = spans[t];
    unsigned int len = spans[texts + t];
    for (unsigned int f = threadIdx.x; f < hidden; f += blockDim.x) {
        const float* col = x + start * hidden + f;
        float v;
        if (mode == 1) {
            v = col[0];
        } else if (mode == 2) {
            v = -3.402823466e38f;
            for (unsigned int i = 0; i < len; i++) {
                v = fmaxf(v, col[(unsigned long long)i * hidden]);
            }
        } else {
            v = 0.0f;
            for (unsigned int i = 0; i < len; i++) {
                v += col[(unsigned long long)i * hidden];
            }
            v = mode == 3 ? v / sqrtf((float)len) : v / (float)len;
        }
        out[(unsigned long long)t * hidden + f] = v;
    }
}

// One block per vector: v /= max(|v|, 1e-12), as torch's F.normalize.
extern "C" __global__ void l2_normalize(float* v, unsigned int texts, unsigned int hidden) {
    __shared__ float red[BLOCK];
    unsigned int t = blockIdx.x;
    if (t >= texts) {
        return;
    }
    float* row = v + (unsigned long long)t * hidden;
    float sq = 0.0f;
    for (unsigned int f = threadIdx.x; f < hidden; f += blockDim.x) {
        sq += row[f] * row[f];
    }
    float norm = fmaxf(sqrtf(block_sum(sq, red)), 1e-12f);
    for (unsigned int f = threadIdx.x; f < hidden; f += blockDim.x) {
        row[f] /= norm;
    }
}
