"""Per-token K-FAC of lora_A and lora_B computed from scratch with autograd (shares no code with
lalora_kernels): hooks on the lora_A / lora_B sub-modules keep their inputs and outputs, the summed
cross-entropy is back-propagated, and the per-token factors are averaged over valid tokens."""
import torch.nn.functional as F


def brute_force_kfac(model, batches):
    from peft.tuners.lora import LoraLayer
    mods = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    acc, T = {}, 0
    model.eval()
    for batch in batches:
        seen = {}
        handles = []
        for name, m in mods.items():
            for part in ("lora_A", "lora_B"):
                def hook(mod, args, out, key=(name, part)):
                    out.retain_grad()
                    seen[key] = (args[0], out)
                handles.append(getattr(m, part)["default"].register_forward_hook(hook))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100, reduction="sum")
        model.zero_grad()
        loss.backward()
        for h in handles:
            h.remove()
        valid = batch["attention_mask"].reshape(-1).bool()
        T += int(valid.sum())
        for name in mods:
            xa, ua = seen[(name, "lora_A")]
            _, vb = seen[(name, "lora_B")]
            x = xa.detach().reshape(-1, xa.shape[-1])[valid]
            u = ua.detach().reshape(-1, ua.shape[-1])[valid]
            gu = ua.grad.reshape(-1, ua.shape[-1])[valid]
            gv = vb.grad.reshape(-1, vb.shape[-1])[valid]
            terms = {"A_in": x.T @ x, "A_grad": gu.T @ gu, "B_in": u.T @ u, "B_grad": gv.T @ gv,
                     "X_grad": gu.T @ gv, "X_in": x.T @ u,
                     "FA": (gu**2).T @ (x**2), "FB": (gv**2).T @ (u**2)}
            for k, v in terms.items():
                acc.setdefault(name, {}).setdefault(k, 0)
                acc[name][k] = acc[name][k] + v
    return {n: {k: v / T for k, v in d.items()} for n, d in acc.items()}, T


def base_factors(model, batches, loss_of, stream_of):
    """Sx and Sg of every LoRA layer from scratch (SPEC section 2), for any model family: hooks keep
    each peft LoRA layer's input x and output h; ``loss_of(model, batch)`` returns the summed loss
    and the valid-token masks per stream; ``stream_of(name)`` says whose tokens a layer sees.
    Factors are means over that stream's valid tokens. Returns {name: {"Sx", "Sg"}}."""
    from peft.tuners.lora import LoraLayer
    mods = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    acc, tokens = {}, {}
    model.eval()
    for batch in batches:
        seen, handles = {}, []
        for name, m in mods.items():
            def hook(mod, args, out, name=name):
                out.retain_grad()
                seen[name] = (args[0], out)
            handles.append(m.register_forward_hook(hook))
        loss, masks = loss_of(model, batch)
        model.zero_grad()
        loss.backward()
        for h in handles:
            h.remove()
        for s, m in masks.items():
            tokens[s] = tokens.get(s, 0) + int(m.sum())
        for name in mods:
            x, h = seen[name]
            valid = masks[stream_of(name)].reshape(-1).bool()
            x = x.detach().reshape(-1, x.shape[-1])[valid].double()
            g = h.grad.reshape(-1, h.shape[-1])[valid].double()
            d = acc.setdefault(name, {"Sx": 0, "Sg": 0, "stream": stream_of(name)})
            d["Sx"] = d["Sx"] + x.T @ x
            d["Sg"] = d["Sg"] + g.T @ g
    return {n: {"Sx": d["Sx"] / tokens[d["stream"]], "Sg": d["Sg"] / tokens[d["stream"]]} for n, d in acc.items()}
