"""LoRA-GA fine-tuning of a (tiny) Llama sharded with FSDP2, then the adapter reloaded with PEFT.

    torchrun --nproc-per-node 2 examples/train_fsdp.py [--out DIR] [--steps N]

CPU + gloo by default; CUDA + NCCL when every rank has a GPU. The model is built from a config (nothing is
downloaded), every rank builds the same base from one seed, and each rank reads its own data. The order of the calls
is the one that scales: inject the adapters, shard, then initialise them from the gradient (``lora_ga_init`` re-
initialises the already-sharded LoRALinear layers: no rank ever holds a whole gradient of the model), train, save
(every rank calls; rank 0 writes the PEFT file).
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist

import lora_kernels as lk

TARGETS = ["q_proj", "v_proj"]
VOCAB = 128


def build_model(device):
    import transformers

    torch.manual_seed(0)  # the same base weights on every rank (and for the PEFT reload below)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return transformers.LlamaForCausalLM(cfg).to(device)


def batches(rank, n, device):
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        out.append({"input_ids": ids.to(device), "labels": ids.to(device)})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="adapter directory (default: a temporary directory)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--r", type=int, default=4)
    args = parser.parse_args()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        model = build_model(device)
        lk.inject_lora(model, TARGETS, r=args.r, alpha=2 * args.r, use_rslora=True)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

        data = batches(rank, args.steps + 2, device)
        lk.lora_ga_init(model, data[:2], r=args.r, alpha=2 * args.r, target_modules=TARGETS)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for step, batch in enumerate(data[2:]):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step}: loss {mean.item() / dist.get_world_size():.4f}", flush=True)

        out = args.out
        if out is None:  # one temporary directory, named by rank 0
            box = [tempfile.mkdtemp(prefix="lk_fsdp_") if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            out = box[0]
        lk.save_adapter(model, out)  # every rank: the adapters are gathered, rank 0 writes

        # the sharded model's logits on one batch (a collective forward), to compare with PEFT's reload
        model.eval()
        probe = batches(99, 1, device)[0]["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=probe).logits.float().cpu()
        if rank == 0:
            import peft

            reloaded = peft.PeftModel.from_pretrained(build_model(device), out).eval()
            with torch.no_grad():
                ref = reloaded(input_ids=probe).logits.float().cpu()
            err = (ref - logits).abs().max().item()
            print(f"saved {out}; PEFT reload max |Δlogits| = {err:.2e}", flush=True)
            if not err < 1e-3:
                raise SystemExit(f"PEFT reload differs from the trained model by {err}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
