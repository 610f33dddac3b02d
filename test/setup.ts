// Runs before every test file. Dawn's Vulkan loader wants XDG_RUNTIME_DIR (createGpu also sets it).
import { mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

if (!process.env.XDG_RUNTIME_DIR) {
  const dir = join(tmpdir(), 'smart-diffusion-xdg-test');
  mkdirSync(dir, { recursive: true });
  process.env.XDG_RUNTIME_DIR = dir;
}
