"""Train ClipCap on cached CLIP features.

    python train.py --data ./data/coco/oscar_split_ViT-B_32_train.pkl --out_dir ./coco_train/
    python train.py --only_prefix --mapping_type transformer --num_layers 8 --prefix_length 40 \
        --prefix_length_clip 40 --data ./data/coco/oscar_split_RN50x4_train.pkl --out_dir ./coco_train/ --is_rn
    torchrun --nproc_per_node 4 train.py --bs 10 ...   # the paper's global batch of 40 on 4 GPUs

Every flag of the original train.py keeps its spelling, meaning and default.
"""
import argparse

from clipcap.files import run_cli
from clipcap.training import TrainConfig, config_from_args, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    original = p.add_argument_group("flags of the original train.py")
    original.add_argument("--data", default=d.data, help="feature pickle or feature store directory")
    original.add_argument("--out_dir", default=d.out_dir)
    original.add_argument("--prefix", default=d.prefix, help="checkpoint file name prefix")
    original.add_argument("--epochs", type=int, default=d.epochs)
    original.add_argument("--save_every", type=int, default=d.save_every)
    original.add_argument("--prefix_length", type=int, default=d.prefix_length)
    original.add_argument("--prefix_length_clip", type=int, default=d.prefix_length_clip)
    original.add_argument("--bs", type=int, default=d.bs, help="batch size per process")
    original.add_argument("--only_prefix", action="store_true", help="freeze GPT-2, train the mapper only")
    original.add_argument("--mapping_type", choices=["mlp", "transformer"], default=d.mapping_type)
    original.add_argument("--num_layers", type=int, default=d.num_layers)
    original.add_argument("--is_rn", action="store_true",
                          help="kept for compatibility: the CLIP width is read from the data")
    original.add_argument("--normalize_prefix", action="store_true")

    new = p.add_argument_group("optimisation")
    new.add_argument("--lr", type=float, default=d.lr)
    new.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    new.add_argument("--grad_accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    new.add_argument("--clip_grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    new.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=d.precision,
                     help="auto: bf16 on GPUs that support it, fp32 otherwise")
    new.add_argument("--compile", action="store_true", help="torch.compile the model")
    new.add_argument("--seed", type=int, default=d.seed)

    run = p.add_argument_group("models, devices, checkpoints, validation")
    run.add_argument("--gpt2", default=d.gpt2, help="GPT-2 name on the hub or local directory")
    run.add_argument("--clip_model", default=d.clip_model,
                     help="the CLIP that made the features, recorded in the checkpoint (default: the one the "
                          "features record; for the original's pickles, the CLIP of their width)")
    run.add_argument("--device", default=d.device)
    run.add_argument("--num_workers", type=int, default=d.num_workers)
    run.add_argument("--resume", default=None, help="out_dir or {prefix}_resume.pt to continue from")
    run.add_argument("--save_original_format", action="store_true",
                     help="also write the original's .pt state_dict beside each .safetensors")
    run.add_argument("--save_latest_every", type=int, default=d.save_latest_every)
    run.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (resumable)")
    run.add_argument("--val_data", default=None, help="validation features: loss each epoch, best checkpoint")
    run.add_argument("--val_captions", type=int, default=d.val_captions,
                     help="also compute CIDEr on this many validation images each epoch")
    run.add_argument("--log_every", type=int, default=d.log_every)
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh even if --out_dir holds a run with the same --prefix (without it: refused)")
    run.add_argument("--skip_nonfinite", action="store_true",
                     help="skip a batch whose loss is NaN or inf (no optimizer step) instead of stopping")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    train(config_from_args(parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
