/* sparsen decode kernels: the ABI shared with Python (engine/__init__.py mirrors every struct with ctypes).
 *
 * One call of sp_decode_step is the whole forward of one token: batch-1 decoding reads every weight once per
 * token, so time is bytes / bandwidth, and a parallel region per GEMV costs more than a 576x576 GEMV. The whole
 * token therefore runs inside ONE OpenMP parallel region; the threads meet at barriers between ops.
 *
 * Layouts: every block linear is stored transposed, W^T [in, out], so input channel i is one contiguous row and
 * skipping it skips its bytes (never a gather + matmul). Under a gate-activation rule up is kept as [out, in]
 * rows and only the active rows are dotted; under an experts rule gate and up both are. lm_head is [vocab, d] rows,
 * dotted, split over the vocabulary (a greedy step on int8 rows bounds them first: head.c).
 * Weights (sp_weight) are fp32, bf16 (uint16, widened in the kernel) or a GGUF file's own quantization (quant.c:
 * codes with a scale and minimum per block of inputs, never requantized). Norm gains, biases, embeddings: fp32. The
 * KV cache is fp32 or IEEE half (converted in the kernels).
 *
 * Any change to a struct below or to the meaning of a field bumps SP_ABI_VERSION; Python refuses a library
 * whose version or struct sizes differ from its own (a stale build: `pip install -e .` rebuilds it).
 */
#ifndef SPARSEN_H
#define SPARSEN_H

#include <stddef.h>
#include <stdint.h>

#define SP_ABI_VERSION 9
#define SP_CODE_TILE 64 /* keys per tile of the int8 label cache (sp_attn.codes) */

/* Rule kinds, numbered as sparsen.core.rules.RuleKind (checked at load time through sp_rule_kinds()). */
#define SP_RULE_KINDS(X) X(DENSE, 0) X(THRESHOLD, 1) X(TOPK, 2) X(GAUSSIAN_TOPK, 3) X(GATE_ACT, 4) X(EXPERTS, 5)
#define SP_RULE_ENUM(name, value) SP_RULE_##name = value,
enum rule_kind { SP_RULE_KINDS(SP_RULE_ENUM) };
#undef SP_RULE_ENUM

/* The block linears, in sparsen.models.LINEAR_NAMES order. */
enum { SP_Q, SP_K, SP_V, SP_O, SP_GATE, SP_UP, SP_DOWN, SP_N_LIN };

enum sp_activation { SP_ACT_SILU = 0, SP_ACT_GELU_TANH = 1 };

/* Decode-time KV selection methods, numbered as sparsen.engine.ATTN_METHODS (checked at load time through
 * sp_attn_methods()); the rules are restated from src/sparsen/methods/attention/ (one file each). */
#define SP_ATTN_METHODS(X)                                                                                       \
    X(ORACLE_TOPK, 1) X(ORACLE_TOPP, 2) X(SINK_WINDOW, 3) X(H2O, 4) X(QUEST, 5) X(DOUBLE_SPARSITY, 6) X(SKETCH, 7)
#define SP_ATTN_ENUM(name, value) SP_ATTN_##name = value,
enum sp_attn_method { SP_ATTN_METHODS(SP_ATTN_ENUM) };
#undef SP_ATTN_ENUM

/* Return codes of the exported functions (Python turns each into a SparsenError). */
enum sp_status {
    SP_OK = 0,
    SP_ERR_POS = -1,       /* position outside [0, max_seq) */
    SP_ERR_TOKEN = -2,     /* token id outside [0, vocab) */
    SP_ERR_SHAPE = -3,     /* a dimension is not positive, head_dim odd, a required pointer is NULL */
    SP_ERR_HEADS = -4,     /* n_heads is not a multiple of n_kv */
    SP_ERR_NOMEM = -5,     /* a workspace allocation failed */
    SP_ERR_THREADS = -6,   /* the workspace was made for fewer threads than the team, or for another model */
    SP_ERR_RULE = -7,      /* an unknown rule kind, a gate_act or experts rule off down, a rule without its
                            * thresholds, an experts rule without its router or with bad sizes */
    SP_ERR_ATTN = -8,      /* an attention selection with an unknown method, bad sizes or a missing state buffer */
};

/* How a weight is stored (sparsen.engine.quant numbers them the same way). */
/* SP_W_Q4_RUNS: 4-bit codes transposed, each input's codes for every output in one run (kernels/quant.c), at most
 * SP_Q4_RUNS_MAX_OUT outputs (its block sums live in a buffer on the stack). */
#define SP_Q4_RUNS_MAX_OUT 8192
enum sp_wtype { SP_W_F32 = 0, SP_W_BF16 = 1, SP_W_Q4 = 2, SP_W_Q8 = 3, SP_W_Q4_RUNS = 4 };

/* One weight matrix, in the transposed layout W^T [in, out] or as rows W [out, in] (sp_layer.w says which). */
typedef struct {
    int type;          /* enum sp_wtype */
    int block;         /* Q4, Q8: inputs per scale and minimum (32, or 16: a power of two) */
    int scale_f32;     /* Q4, Q8: scales and minima are fp32, else IEEE half */
    int stride;        /* elements per stored row: transposed, >= out (Q4: a multiple of 64, Q8: of 16); rows: in */
    const void *data;  /* the fp32 or bf16 values, or the codes (Q4: 4-bit unsigned, two per byte; Q8: int8) */
    const void *scale; /* Q4, Q8: [in / block, stride] transposed, [rows, in / block] as rows */
    const void *min;   /* Q4, Q8: as scale, or NULL (no minimum) */
} sp_weight;

typedef struct {
    int kind;          /* enum rule_kind, on this linear's input (SP_RULE_GATE_ACT, SP_RULE_EXPERTS only on down) */
    int same_as_prev;  /* this linear's input mask equals the previous linear's (k after q, v after k, up after gate) */
    float param;       /* TOPK: share dropped; GAUSSIAN_TOPK: z = Phi^-1((1+s)/2) */
    const float *thr;  /* per-input-channel thresholds (THRESHOLD, GATE_ACT) */
} sp_rule;

typedef struct {
    sp_weight w[SP_N_LIN];        /* W^T [in, out]; up under a gate_act rule on down, gate and up under an experts
                                   * rule: W [out, in] */
    const float *bias[SP_N_LIN];  /* [out] or NULL */
    const float *attn_norm;       /* gain [d] of the norm before attention */
    const float *mlp_norm;        /* gain [d] of the norm before the MLP */
    const float *attn_out_norm;   /* NULL, or gain [d] of a norm on the attention output (Gemma 3) */
    const float *mlp_out_norm;    /* NULL, or gain [d] of a norm on the MLP output (Gemma 3) */
    const float *q_norm, *k_norm; /* NULL, or gain [head_dim] of a per-head norm before RoPE (Gemma 3) */
    const float *basis;           /* NULL, or R [d, d] ([in, out], fp32): h <- h R at this layer's input */
    const float *rope_cos;        /* [max_seq, head_dim] (HF rotate-half convention) */
    const float *rope_sin;
    int window;                   /* 0: attend to every position; W: to the last W positions only */
    int attn_select;              /* 1: the model's KV selection (sp_model.attn) runs here (window 0 only) */
    sp_rule rule[SP_N_LIN];
    /* R-Sparse: NULL, or the low-rank term of the dropped inputs, y += B A x_dropped, stored as A^T [in, rank]
     * (rows of dropped channels are read) and B^T [rank, out], fp32 or bf16 (sp_model.wbf16) */
    const void *lr_a[SP_N_LIN], *lr_b[SP_N_LIN];
    int lr_rank[SP_N_LIN];
    /* MoEfication (an SP_RULE_EXPERTS rule on down): the router R [n_experts, d] fp32 and its bias [n_experts] (or
     * NULL) score the experts on the MLP's normed input; the top_k best are read. Expert e's channels are
     * experts[e * expert_size ... (e + 1) * expert_size), ascending; n_experts * expert_size = inter. */
    const float *router, *router_bias;
    const int *experts;
    int n_experts, expert_size, top_k;
} sp_layer;

/* Decode-time KV selection on the layers with attn_select (sparsen/core/attention.py states the protocol): on a
 * non-dense step each selection head picks the cached positions its query heads read, and attention reads only
 * those K and V rows. Selection heads: the KV heads when shared (values summed over the group's query heads), else
 * the query heads. The state buffers are Python's (numpy), [n_layers, ...] even for the layers that do not select;
 * the kernels update them on every step, dense ones included (the prompt's keys and H2O's prompt mass). */
typedef struct {
    int method;           /* enum sp_attn_method */
    int sel_heads;        /* n_kv or n_heads */
    int tokens;           /* > 0: a budget of this many keys; 0: ceil(density * keys) */
    double density;
    double p;             /* oracle-topp: the share of the probability mass kept */
    double recent_share;  /* h2o: the share of the budget given to the most recent keys */
    int sinks;            /* sink-window, sketch: first positions always kept */
    int local;            /* sketch: the last `local` positions always kept */
    int page, min_pages;  /* quest: keys per page, pages read at least (the current one included) */
    int max_pages;        /* quest: ceil(max_seq / page) */
    int rank;             /* double-sparsity, sketch: width r of a projected key (its label) */
    int lab_heads;        /* heads of the label cache: n_kv, or n_heads (double-sparsity per query head) */
    float label_scale;    /* factor on an approximate score (sketch: attn_scale; double-sparsity: 1) */
    const float *proj;    /* [n_layers, lab_heads, head_dim, rank] P: a key's label is k P */
    const float *qproj;   /* the same for the query (P again, or the sketch's bilinear pair): score (q Pq).(k P) */
    int label_bits;       /* 8: each label kept as int8 codes on its max-abs scale (sketch); 0: fp32 labels */
    float *labels;        /* [n_layers, lab_heads, rank, max_seq] fp32 labels: channel-major, the estimate streams
                             each channel (label_bits 0) */
    int8_t *codes;        /* [n_layers, lab_heads, ceil(max_seq / SP_CODE_TILE), rank, SP_CODE_TILE] the labels'
                             int8 codes in tiles of keys, channel-major within a tile: one contiguous run per tile
                             (label_bits 8) */
    float *code_scale;    /* [n_layers, lab_heads, max_seq] a key's label = codes * code_scale */
    void *kmin, *kmax;    /* quest: [n_layers, n_kv, max_pages, head_dim] per-page channel min / max, KV dtype */
    double *mass;         /* h2o: [n_layers, sel_heads, max_seq] attention probability accumulated per key */
    uint8_t *held;        /* h2o: [n_layers, sel_heads, max_seq] 1 while held (all 1 at a sequence's start) */
    double *tally;        /* [n_layers, 4] summed over the non-dense steps: keys read (union over a KV head's query
                           * heads, summed over KV heads), causal keys (x n_kv), estimate vectors (x n_kv), steps */
} sp_attn;

/* A greedy step's bound on every logit of an int8 lm_head (blocks of 32, half scales >= 0; kernels/head.c): each
 * code's top five bits c = (q >> 3) + 16 = 2 nib + bit, nib = (q >> 4) + 8, packed in tiles of 64 rows. */
typedef struct {
    int rows;               /* the vocabulary rounded up to a multiple of 64 (the padded rows' scales are 0) */
    const uint8_t *nib;     /* [rows / 64, d / 32, 4, 4, 64] by tile, block, group g of 8 inputs, 16 rows s: byte
                             * 4l + m holds nib of input 8g + m (low nibble) and 8g + 4 + m (high) of row 16s + l */
    const uint64_t *bits;   /* [rows / 64, d / 32, 4, 4, 2]: bit 4l + m of the first (second) word, the fifth bit
                             * (q >> 3) & 1 of input 8g + m (8g + 4 + m) of row 16s + l; 64-byte aligned */
    const uint16_t *scale;  /* [rows / 64, d / 32, 64] the rows' scales (IEEE half), a tile's block at a time */
} sp_head_bound;

typedef struct {
    int n_layers, d, n_heads, n_kv, head_dim, inter, vocab, max_seq;
    int wbf16;                /* the low-rank factors are bf16 (else fp32) */
    int activation;           /* enum sp_activation */
    float eps;                /* RMSNorm epsilon */
    float attn_scale;         /* factor on q.k */
    float embed_scale;        /* the embedding row is multiplied by this */
    float logit_softcap;      /* 0, or c: logits <- c tanh(logits / c) */
    const sp_layer *layers;
    const float *embed;       /* [vocab, d] fp32 */
    const float *final_norm;  /* gain [d] */
    sp_weight lm_head;        /* rows [vocab, d] */
    int kv_f16;               /* the KV cache (and Quest's page summaries) hold IEEE half, else fp32 */
    void *k_cache, *v_cache;  /* [n_layers, n_kv, max_seq, head_dim] */
    int64_t *active;          /* [n_layers, SP_N_LIN] active input channels (rows for gate_act up), summed */
    int64_t *seen;            /* [n_layers, SP_N_LIN] input channels offered, summed */
    int64_t *blocks;          /* NULL, or [n_layers, SP_N_LIN] blocks of inputs with an active channel (quantized
                               * transposed weights: the blocks whose scales are read), summed */
    uint64_t *mask_sum;       /* NULL, or [n_layers, SP_N_LIN] a checksum of each sparse token's active channels (a
                               * sum of hashed indices), summed: two engines that chose the same masks agree on it */
    const sp_attn *attn;      /* NULL: every layer attends densely */
    double *timing;           /* NULL, or [threads, SP_N_LIN, 3] per thread and block linear, summed over layers and
                               * steps: seconds in its product, seconds waiting at the barrier after it, products */
    const sp_head_bound *head_bound; /* NULL, or lm_head's bound: greedy steps read it instead of every row */
    int64_t *head_tally;      /* NULL, or [2]: greedy steps with head_bound, and the lm_head rows they dotted */
} sp_model;

/* Buffers of one engine, allocated once (sp_workspace_create) for a model and a thread count. Opaque to Python. */
typedef struct sp_workspace sp_workspace;

enum { SP_STRUCT_RULE = 0, SP_STRUCT_LAYER = 1, SP_STRUCT_MODEL = 2, SP_STRUCT_ATTN = 3, SP_STRUCT_WEIGHT = 4,
       SP_STRUCT_HEAD_BOUND = 5 };

int sp_abi_version(void);
const char *sp_isa(void);        /* "avx,avx2,fma,...": the extensions compiled in (cpuinfo names) */
int sp_q4_runs_vectorized(void);  /* 1: SP_W_Q4_RUNS products have their vector kernel in this build */
long sp_struct_size(int which);   /* sizeof a shared struct (SP_STRUCT_*), -1 for an unknown one */
const char *sp_rule_kinds(void);  /* "DENSE=0,THRESHOLD=1,..." */
const char *sp_attn_methods(void);  /* "ORACLE_TOPK=1,ORACLE_TOPP=2,..." */
int sp_check_model(const sp_model *M);
sp_workspace *sp_workspace_create(const sp_model *M, int n_threads, int *status);
void sp_workspace_free(sp_workspace *ws);
/* The forward of `token` at position pos; writes logits [vocab]. dense != 0 ignores every rule (the prompt is
 * prefilled dense, as in the decode protocol). greedy != 0 with a head_bound: only the largest logit is needed;
 * logits are exact where the bound says they can be the largest and -inf elsewhere (the argmax is the same). */
int sp_decode_step(const sp_model *M, sp_workspace *ws, int pos, int token, float *logits, int dense, int greedy);
int sp_head_bound_vectorized(void); /* 1: the head bound has its vector kernel here (else greedy heads stay off) */

/* The ops alone, for tests (same code as the decode step; these allocate their own scratch). */
int sp_test_gemv(const sp_weight *w, int in, int out, const float *x, const int *act, int n_act, float *y,
                 int threads);
int sp_test_dot_rows(const sp_weight *w, int in, int n_rows, const float *x, const int *rows, int n_sel, float *y,
                     int threads);
/* mode 0: out = the bound on every row's logit; 1: the logits a greedy step leaves; 2: every logit (1, 2:
 * softcapped with cap > 0). */
int sp_test_head(const sp_weight *w, const sp_head_bound *hb, int vocab, int d, const float *x, float *out,
                 int mode, float cap, int threads);
int sp_test_mask(int kind, float param, const float *thr, const float *x, int n, int *act);
/* The positions of v[0:m) at or above its k-th largest (the selections' top-k, ties included); their count. */
int sp_test_top_budget(const float *v, int m, int k, int *out);

#endif
