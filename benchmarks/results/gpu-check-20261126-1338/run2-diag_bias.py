import sys, torch, torch.nn.functional as F
sys.path.insert(0, "tests")
from reference_masked_matmul import reference, random_inputs, make_mask
from pyfinetune import ops
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
def ratio(y, ref, k, dt):
    u = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dt]
    e, t = ref["y"], ref["y_terms"]; acc = (k + 2) * 2**-24 * t
    b = u * (e.abs() + acc) + acc
    return ((y.double().cpu() - e).abs() / b).max().item()
for dt in (torch.bfloat16, torch.float16):
    for (n, k, m) in [(1, 70, 90), (64, 129, 257), (300, 1023, 33), (256, 4096, 4096)]:
        g = torch.Generator().manual_seed(n + k)
        x, w, b, go = random_inputs(n, k, m, dt, "cuda", bias=True, generator=g)
        mask = make_mask(m, k, 0.6, generator=g)
        ref = reference(x, w, mask, b, go)
        wm = w * mask.cuda()
        ours = ops.masked_matmul(x, w, mask.cuda(), b)
        lin = F.linear(x, wm, b)
        two = (x @ wm.t()) + b
        one = (x.float() @ wm.float().t() + b.float()).to(dt)
        print(dt, (n, k, m), "ours", round(ratio(ours, ref, k, dt), 2), "F.linear", round(ratio(lin, ref, k, dt), 2),
              "mm then +b", round(ratio(two, ref, k, dt), 2), "fp32 one rounding", round(ratio(one, ref, k, dt), 2),
              "ours==F.linear", torch.equal(ours, lin), "ours==mm+b", torch.equal(ours, two), flush=True)
