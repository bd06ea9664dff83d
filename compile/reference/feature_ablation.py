"""`python compile/reference/feature_ablation.py` (in a directory with bundle/ from ranker_ablation.py, which
caches bundle/exp_holdout_M8.pt): which signals complement SASRec? A listwise linear ranker over simple features, trained on held-out-SASRec
examples, evaluated on validation users (main SASRec candidates)."""
import random, math, sys
import numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from ranker_ablation import make_examples
from palr.sasrec import SASRec
from palr.bundle import Bundle
from palr.corpus import Corpus
from palr import metrics
from palr.ranking import target_rank, order_by_scores

torch.set_num_threads(1)
bundle = Bundle.open("bundle")
corpus = Corpus.load("data/ml-100k")
cat, split = corpus.catalog, corpus.split
main = SASRec.load(bundle.path("sasrec_torch"))
hold = SASRec.load("bundle/exp_holdout_M8.pt")
users = sorted(split.train)
M = 8
cuts = []
for u in users:
    tr = split.train[u]
    for t in range(len(tr) - M, len(tr)):
        cuts.append((u, tr[:t], tr[t], tr[t + 1:] + [split.valid[u], split.test[u]]))
train_rows = make_examples(corpus, hold, cuts, 20)
rng = random.Random(0)
vusers = sorted(rng.sample(users, 300))
vcuts = [(u, split.train[u], split.valid[u], []) for u in vusers]  # serving's mask: the history only
valid_rows = make_examples(corpus, main, vcuts, 20, natural_only=False)
# all validation users for a bigger sample
allv = make_examples(corpus, main, [(u, split.train[u], split.valid[u], []) for u in users], 20, natural_only=False)

pop = np.zeros(cat.num_indices)
for it in cat.items:
    pop[cat.index(it.id)] = it.train_count
logpop = np.log1p(pop)
years = np.array([0] + [int(it.year) if it.year else 1990 for it in cat.items], dtype=float)
genres = sorted({g for it in cat.items for g in it.genres})
G = np.zeros((cat.num_indices, len(genres)))
for it in cat.items:
    for g in it.genres:
        G[cat.index(it.id), genres.index(g)] = 1
E = hold.item_emb.weight.detach().numpy()
Em = main.item_emb.weight.detach().numpy()


def feats(row, emb):
    h = [cat.index(i) for i in row["history"]]
    c = [cat.index(i) for i in row["candidates"]]
    s = np.array(row["scores"])
    r = s - (s.max() + np.log(np.exp(s - s.max()).sum()))
    hg = G[h[-20:]].mean(0)
    last = emb[h[-1]]
    hist = emb[h[-10:]].mean(0)
    f = np.stack([
        r,
        np.arange(len(c)) / 20.0,
        logpop[c] / 6,
        (years[c] - 1990) / 10,
        (years[c] >= 1997).astype(float),
        G[c] @ hg,
        (emb[c] @ last) / 10,
        (emb[c] @ hist) / 10,
        np.full(len(c), (np.mean(years[h[-10:]]) - 1990) / 10) * (years[c] - 1990) / 10,
    ], axis=1)
    return f


def data(rows, emb):
    X = torch.tensor(np.stack([feats(r, emb) for r in rows]), dtype=torch.float32)
    y = [r["target_position"] for r in rows]
    return X, y


Xt, yt = data(train_rows, E)
Xv, yv = data(allv, Em)
names = ["retrieval_logsoftmax", "rank", "logpop", "year", "year>=1997", "genre_overlap", "emb_last", "emb_hist", "year_x_histyear"]


def fit(cols):
    w = torch.zeros(len(cols), requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    yt_t = torch.tensor(yt)
    for _ in range(300):
        logits = Xt[:, :, cols] @ w
        loss = torch.nn.functional.cross_entropy(logits, yt_t)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        sv = (Xv[:, :, cols] @ w).numpy()
    ranks = [target_rank(order_by_scores(list(s)), t) for s, t in zip(sv, yv)]
    return metrics.ndcg(ranks, 10), w.detach().numpy().round(3)


base = metrics.ndcg([target_rank(range(20), t) for t in yv], 10)
print("validation users", len(allv), "retrieval ndcg", round(base, 4), "train examples", len(train_rows))
for cols in ([0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [0, 6], [0, 7], [0, 8], [0, 2, 3, 4, 5], list(range(9))):
    n, w = fit(cols)
    print([names[c] for c in cols], round(n, 4), round(n / base, 3), w)

# ---- time-aware popularity: interactions in the W days before the user's cut, training split only
from palr.data import read_interactions
inter = read_interactions(corpus.files.inter)
ts = {}
for x in inter:
    ts[(x.user_id, x.item_id)] = x.timestamp
train_events = sorted((ts[(u, i)], cat.index(i)) for u in users for i in split.train[u])
times = np.array([t for t, _ in train_events])
items_arr = np.array([i for _, i in train_events])


def recent_pop(t_cut, window_days):
    lo = np.searchsorted(times, t_cut - window_days * 86400)
    hi = np.searchsorted(times, t_cut)
    return np.bincount(items_arr[lo:hi], minlength=cat.num_indices)


def time_feats(rows, window):
    out = []
    for r in rows:
        u = r["user"]
        t_cut = ts[(u, r["history"][-1])]
        rp = np.log1p(recent_pop(t_cut, window))
        c = [cat.index(i) for i in r["candidates"]]
        out.append(rp[c] / 5)
    return torch.tensor(np.stack(out), dtype=torch.float32)[..., None]


for window in (7, 30):
    Xt2 = torch.cat([Xt, time_feats(train_rows, window)], -1)
    Xv2 = torch.cat([Xv, time_feats(allv, window)], -1)
    Xt, Xv, Xt_old, Xv_old = Xt2, Xv2, Xt, Xv
    names.append(f"recent_pop_{window}d")
    for cols in ([0, len(names) - 1], [0, 2, len(names) - 1], list(range(len(names)))):
        n, w = fit(cols)
        print([names[c] for c in cols], round(n, 4), round(n / base, 3), w)
    Xt, Xv = Xt_old, Xv_old
    names.pop()
