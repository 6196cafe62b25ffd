/* The MLP: gate and up with their input masks (or a gate-activation mask with up read by rows, or routed experts
 * with gate and up read by rows), the activation, down on its masked input. */
#include <string.h>

#include "ops.h"

/* MoEfication's routing, on one thread: the router's scores of x [d], the top_k experts (the first of equal scores),
 * their channels into ws->gate_act, expert by expert in ascending expert order; counts gate's and up's rows. */
static void sp_route(const sp_model *M, const sp_layer *L, int l, const float *x, sp_workspace *ws) {
    const int E = L->n_experts, m = L->expert_size, d = M->d;
    SP_ASSERT(E >= 1 && E <= ws->max_experts && L->top_k >= 1 && L->top_k <= E && E * m == M->inter);
    float *s = ws->expert_scores;
    for (int e = 0; e < E; e++) s[e] = sp_dot(L->router + (size_t)e * d, x, d) + (L->router_bias ? L->router_bias[e] : 0.f);
    unsigned char chosen[E];
    memset(chosen, 0, (size_t)E);
    for (int r = 0; r < L->top_k; r++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (!chosen[e] && (best < 0 || s[e] > s[best])) best = e;
        chosen[best] = 1;
    }
    int n = 0;
    for (int e = 0; e < E; e++)
        if (chosen[e]) {
            memcpy(ws->gate_act + n, L->experts + (size_t)e * m, sizeof(int) * (size_t)m);
            n += m;
        }
    ws->n_gate_act = n;
    for (int j = SP_GATE; j <= SP_UP; j++) {
        M->active[(size_t)l * SP_N_LIN + j] += n;
        M->seen[(size_t)l * SP_N_LIN + j] += M->inter;
    }
}

/* The MLP branch of layer l: h += [norm](down(act(gate(x)) * up(x))), x = norm(h). */
void sp_mlp_stage(sp_ctx *c, const sp_model *M, int l, int dense) {
    const sp_layer *L = &M->layers[l];
    sp_workspace *ws = c->ws;
    sp_thread *t = c->t;
    const int d = M->d, I = M->inter, act_kind = M->activation;
    sp_rmsnorm(ws->h, L->mlp_norm, d, M->eps, t->x);
    const int experts = L->rule[SP_DOWN].kind == SP_RULE_EXPERTS; /* gate and up stored as [out, in] rows */
    const int up_rows = L->rule[SP_DOWN].kind == SP_RULE_GATE_ACT || experts; /* up stored as [out, in] rows */
    if (experts) {
        int lo, hi, n = I;
        const int *rows = NULL;
        if (!dense) {
            if (c->ith == 0) sp_route(M, L, l, t->x, ws);
            SP_BARRIER(); /* the routed channels are listed */
            n = ws->n_gate_act, rows = ws->gate_act;
        }
        sp_split(n, c->ith, c->nth, &lo, &hi);
        sp_dot_rows(&L->w[SP_GATE], d, t->x, rows, lo, hi, ws->g);
        sp_dot_rows(&L->w[SP_UP], d, t->x, rows, lo, hi, ws->u);
        for (int a = lo; a < hi; a++) {
            const int j = rows ? rows[a] : a;
            ws->mid[j] = sp_act(act_kind, ws->g[j]) * ws->u[j];
        }
        SP_BARRIER(); /* mid complete on the routed channels */
        sp_linear(c, M, l, SP_DOWN, ws->mid, I, rows ? rows : ws->iota, n, d, ws->proj, dense);
        if (L->mlp_out_norm) {
            SP_BARRIER(); /* the norm reads all of proj */
        }
        sp_add_branch(c->ith, c->nth, d, M->eps, L->mlp_out_norm, ws->proj, ws->h);
        SP_BARRIER(); /* h complete before the next layer reads it */
        return;
    }
    const int gate_rule = !dense && up_rows;
    int n_act = sp_layer_mask(L, SP_GATE, dense, t->x, d, t->act, t->scratch);
    sp_linear(c, M, l, SP_GATE, t->x, d, t->act, n_act, I, ws->g, dense);
    int lo, hi;
    sp_split(I, c->ith, c->nth, &lo, &hi); /* the share of g (and of u) this thread holds */
    if (dense && up_rows) { /* the dense prompt under a gate-activation plan: every row of up */
        sp_dot_rows(&L->w[SP_UP], d, t->x, NULL, lo, hi, ws->u);
        for (int j = lo; j < hi; j++) ws->mid[j] = sp_act(act_kind, ws->g[j]) * ws->u[j];
    } else if (!gate_rule) {
        const int *up_act = t->act;
        int n_up = n_act;
        if (!dense && !L->rule[SP_UP].same_as_prev) {
            n_up = sp_layer_mask(L, SP_UP, dense, t->x, d, t->act2, t->scratch);
            up_act = t->act2;
        }
        sp_linear(c, M, l, SP_UP, t->x, d, up_act, n_up, I, ws->u, dense);
        for (int j = lo; j < hi; j++) ws->mid[j] = sp_act(act_kind, ws->g[j]) * ws->u[j];
    }
    SP_BARRIER(); /* g (and mid) complete */
    if (gate_rule) { /* CATS / CHESS: channel j active iff |act(g_j)| > t_j; up rows and down inputs only for those */
        if (c->ith == 0) {
            const float *thr = L->rule[SP_DOWN].thr;
            int n = 0;
            for (int j = 0; j < I; j++) {
                const float a = sp_act(act_kind, ws->g[j]);
                ws->mid[j] = a;
                if (fabsf(a) > thr[j]) ws->gate_act[n++] = j;
            }
            ws->n_gate_act = n;
            M->active[(size_t)l * SP_N_LIN + SP_UP] += n;
            M->seen[(size_t)l * SP_N_LIN + SP_UP] += I;
        }
        SP_BARRIER(); /* the active list is complete */
        const int n = ws->n_gate_act;
        const int r0 = (int)((long)n * c->ith / c->nth), r1 = (int)((long)n * (c->ith + 1) / c->nth);
        sp_dot_rows(&L->w[SP_UP], d, t->x, ws->gate_act, r0, r1, ws->u);
        for (int a = r0; a < r1; a++) ws->mid[ws->gate_act[a]] *= ws->u[ws->gate_act[a]];
        SP_BARRIER(); /* mid complete on the active channels */
        sp_linear(c, M, l, SP_DOWN, ws->mid, I, ws->gate_act, n, d, ws->proj, 0);
    } else {
        n_act = sp_layer_mask(L, SP_DOWN, dense, ws->mid, I, t->act, t->scratch);
        sp_linear(c, M, l, SP_DOWN, ws->mid, I, t->act, n_act, d, ws->proj, dense);
    }
    if (L->mlp_out_norm) {
        SP_BARRIER(); /* the norm reads all of proj */
    }
    sp_add_branch(c->ith, c->nth, d, M->eps, L->mlp_out_norm, ws->proj, ws->h);
    SP_BARRIER(); /* h complete before the next layer reads it */
}
