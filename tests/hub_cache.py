"""A local Hugging Face Hub cache, laid out exactly as huggingface_hub leaves a download (offline tests).

    <cache>/models--<org>--<name>/refs/main            40-hex commit id, no trailing newline
    <cache>/models--<org>--<name>/snapshots/<commit>/  the repo's files
"""
import hashlib
import shutil
from pathlib import Path
from typing import Dict, Union

import huggingface_hub.constants as hf_constants
import timm
from safetensors.torch import save_file


class HubCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def add_repo(self, repo_id: str, files: Dict[str, Union[Path, bytes, str]]) -> Path:
        """Put ``files`` (name -> source path or content) into the cache as repo ``repo_id``'s main revision."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode())
        commit = digest.hexdigest()
        repo_dir = self.root / ('models--' + repo_id.replace('/', '--'))
        snapshot = repo_dir / 'snapshots' / commit
        if repo_dir.exists():
            shutil.rmtree(repo_dir)
        snapshot.mkdir(parents=True)
        for name, src in files.items():
            dst = snapshot / name
            if isinstance(src, Path):
                shutil.copyfile(src, dst)
            elif isinstance(src, bytes):
                dst.write_bytes(src)
            else:
                dst.write_text(src)
        (repo_dir / 'refs').mkdir()
        (repo_dir / 'refs' / 'main').write_text(commit)  # no newline: huggingface_hub reads it verbatim
        return snapshot

    def add_folder(self, repo_id: str, folder: Path) -> Path:
        return self.add_repo(repo_id, {p.name: p for p in Path(folder).iterdir() if p.is_file()})


def use_cache(monkeypatch, root: Path) -> HubCache:
    """Point huggingface_hub at ``root`` and forbid downloads, for the current process."""
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(root))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(root))
    return HubCache(root)


def add_timm_stand_in(cache: HubCache, tmp_path: Path, source: str):
    """A small stand-in of timm's weights repo ``timm/<source>`` (random weights of the right architecture)."""
    arch = source.split('.')[0]
    model = timm.create_model(arch)
    path = Path(tmp_path) / f'{arch}.safetensors'
    save_file(model.state_dict(), str(path))
    cache.add_repo(f'timm/{source}', {'model.safetensors': path})
    return model, path
