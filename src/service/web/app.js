// smart-diffusion service page: submit a prompt, follow its progress live (the job's SSE stream),
// play the finished video, open its memory timeline, and watch the queue and each worker's memory.
// Plain JavaScript, no framework, no build step; it talks to the API described by /openapi.json.
//
// Every API call sends `Authorization: Bearer <key>` when the user stored a key (localStorage).
// That is why the event stream is read with fetch() rather than EventSource (which cannot send
// headers) and why the video, GIF, sidecar and timeline are fetched into blob: URLs rather than
// linked directly (a <video src> or a new tab cannot send the header either).
'use strict';

(() => {
  const KEY_STORE = 'smart-diffusion.api-key';
  const MINE_STORE = 'smart-diffusion.videos';
  const MINE_MAX = 30;
  const QUEUE_EVERY_MS = 3000;
  const TERMINAL = new Set(['completed', 'failed', 'cancelled']);
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- helpers

  function fmtBytes(n) {
    if (typeof n !== 'number' || !Number.isFinite(n)) return '–';
    const a = Math.abs(n);
    if (a >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
    if (a >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
    if (a >= 2 ** 10) return `${(n / 2 ** 10).toFixed(1)} KiB`;
    return `${n} B`;
  }

  function fmtSeconds(s) {
    if (typeof s !== 'number' || !Number.isFinite(s) || s < 0) return '–';
    if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
    const m = Math.floor(s / 60);
    return `${m} min ${Math.round(s - m * 60)} s`;
  }

  function toMs(t) {
    if (t === null || t === undefined || t === '') return NaN;
    if (typeof t === 'number') return t < 1e12 ? t * 1000 : t; // seconds or milliseconds since the epoch
    return Date.parse(t);
  }

  function fmtAgo(t) {
    const ms = toMs(t);
    if (!Number.isFinite(ms)) return '–';
    const s = Math.max(0, (Date.now() - ms) / 1000);
    return s < 1 ? 'now' : `${fmtSeconds(s)} ago`;
  }

  const sleep = (ms, signal) =>
    new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
    });

  function apiKey() {
    try { return localStorage.getItem(KEY_STORE) || ''; } catch { return ''; }
  }

  function authHeaders(extra) {
    const h = Object.assign({}, extra);
    const k = apiKey();
    if (k) h.Authorization = `Bearer ${k}`;
    return h;
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function errorFrom(res, json, text) {
    if (json && typeof json.error === 'string' && json.error) return new ApiError(res.status, json.error);
    if (res.status === 401 || res.status === 403) return new ApiError(res.status, 'the service wants an API key: enter it under "API key"');
    return new ApiError(res.status, `the service answered HTTP ${res.status}${text ? `: ${text.slice(0, 200)}` : ''}`);
  }

  /** JSON request to the API; throws ApiError with the service's own one-line message. */
  async function api(path, opts = {}) {
    let res;
    try {
      res = await fetch(path, {
        method: opts.method || 'GET',
        headers: authHeaders(opts.body !== undefined ? { 'content-type': 'application/json' } : {}),
        body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
        signal: opts.signal,
        cache: 'no-store',
      });
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      throw new ApiError(0, 'the service did not answer; is it still running?');
    }
    const text = await res.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
    if (!res.ok) throw errorFrom(res, json, text);
    return json;
  }

  /** A file of the API as a blob: URL (so the Authorization header goes with it). */
  async function blobUrl(path, signal) {
    const res = await fetch(path, { headers: authHeaders(), signal, cache: 'no-store' });
    if (!res.ok) {
      const text = await res.text().catch(() => '');
      let json = null;
      try { json = JSON.parse(text); } catch { /* not JSON */ }
      throw errorFrom(res, json, text);
    }
    return URL.createObjectURL(await res.blob());
  }

  function needKey(err) {
    if (err && (err.status === 401 || err.status === 403)) {
      $('key-box').open = true;
      return true;
    }
    return false;
  }

  // ---------------------------------------------------------------- API key

  function showKeyStatus() {
    $('api-key-status').textContent = apiKey() ? 'A key is stored in this browser.' : 'No key stored.';
  }

  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const v = $('api-key').value.trim();
    try {
      if (v) localStorage.setItem(KEY_STORE, v);
      else localStorage.removeItem(KEY_STORE);
    } catch {
      $('api-key-status').textContent = 'This browser refused to store the key (storage disabled).';
      return;
    }
    $('api-key').value = '';
    showKeyStatus();
    refreshQueue();
    if (current) watch(current.id);
  });
  $('api-key-clear').addEventListener('click', () => {
    try { localStorage.removeItem(KEY_STORE); } catch { /* nothing stored */ }
    showKeyStatus();
    refreshQueue();
  });

  // ---------------------------------------------------------------- "your videos" (this browser's)

  function loadMine() {
    try {
      const v = JSON.parse(localStorage.getItem(MINE_STORE) || '[]');
      return Array.isArray(v) ? v.filter((x) => x && typeof x.id === 'string') : [];
    } catch {
      return [];
    }
  }

  function saveMine(list) {
    try { localStorage.setItem(MINE_STORE, JSON.stringify(list.slice(0, MINE_MAX))); } catch { /* storage off: the list lives for this page only */ }
  }

  let mine = loadMine();

  function remember(id, prompt, state) {
    const old = mine.find((x) => x.id === id);
    if (old) {
      if (state) old.state = state;
      if (prompt) old.prompt = prompt;
    } else {
      mine.unshift({ id, prompt: prompt || '', state: state || 'queued', created: Date.now() });
    }
    saveMine(mine);
    renderMine();
  }

  function renderMine() {
    const ul = $('mine');
    ul.replaceChildren();
    $('mine-empty').hidden = mine.length > 0;
    for (const v of mine) {
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.type = 'button';
      b.dataset.id = v.id;
      if (current && current.id === v.id) b.setAttribute('aria-current', 'true');
      const p = document.createElement('span');
      p.className = 'p';
      p.textContent = v.prompt || v.id;
      const s = document.createElement('span');
      s.className = `state ${v.state}`;
      s.textContent = v.state;
      b.append(p, s);
      b.addEventListener('click', () => select(v.id));
      li.append(b);
      ul.append(li);
    }
  }

  // ---------------------------------------------------------------- submitting

  const form = $('gen-form');

  function requestBody() {
    const body = { prompt: $('prompt').value.trim() };
    for (const el of form.querySelectorAll('input[type="number"]')) {
      if (el.value.trim() === '') continue;
      body[el.name] = Number(el.value);
    }
    const neg = $('negative').value.trim();
    if (neg) body.negative_prompt = neg;
    if ($('snapshot').checked) body['report.memory_snapshot'] = true;
    return body;
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const err = $('form-error');
    err.hidden = true;
    const body = requestBody();
    if (!body.prompt) {
      err.textContent = 'prompt is empty; type what the video should show';
      err.hidden = false;
      $('prompt').focus();
      return;
    }
    const btn = $('submit');
    btn.disabled = true;
    btn.textContent = 'Submitting…';
    try {
      const r = await api('v1/videos', { method: 'POST', body });
      remember(r.id, body.prompt, r.state || 'queued');
      select(r.id);
    } catch (ex) {
      err.textContent = ex.message;
      err.hidden = false;
      needKey(ex);
    } finally {
      btn.disabled = false;
      btn.textContent = 'Generate';
    }
  });

  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });

  // ---------------------------------------------------------------- one video: state, live progress, result

  /** The job shown: { id, ctl: AbortController, job: last body, resultFor: id whose files are loaded }. */
  let current = null;
  let blobs = [];

  function releaseBlobs() {
    for (const u of blobs) URL.revokeObjectURL(u);
    blobs = [];
  }

  function link(job, name) {
    const l = job && job.links && job.links[name];
    if (typeof l === 'string' && l) return l.startsWith('/') ? l.slice(1) : l; // relative to the page
    return `v1/videos/${encodeURIComponent(job.id)}/${name === 'memory_snapshot' ? 'memory-snapshot' : name}`;
  }

  function select(id) {
    if (location.hash !== `#video=${id}`) history.replaceState(null, '', `#video=${encodeURIComponent(id)}`);
    watch(id);
  }

  function showJobError(msg) {
    const el = $('job-error');
    el.textContent = msg || '';
    el.hidden = !msg;
  }

  function render(job) {
    if (!current || job.id !== current.id) return;
    const prev = current.job;
    current.job = job;
    $('job-empty').hidden = true;
    $('job').hidden = false;
    const prompt = job.prompt || (job.settings && (job.settings.prompt || (job.settings.request && job.settings.request.prompt))) || '';
    $('job-prompt').textContent = prompt ? `“${prompt}”` : job.id;
    const st = $('job-state');
    st.textContent = job.state;
    st.className = `state ${job.state}`;
    const pr = job.progress || {};
    $('job-phase').textContent =
      job.state === 'completed' ? 'done' : job.state === 'queued' ? 'waiting for a worker' : TERMINAL.has(job.state) ? '–' : pr.phase || '–';
    const steps = Number(pr.steps) || 0;
    const step = Number(pr.step) || 0;
    $('job-step').textContent = steps ? `${step} / ${steps}` : '–';
    const bar = $('job-progress');
    if (job.state === 'completed') bar.value = 1;
    else bar.value = steps ? Math.min(1, step / steps) : 0;
    bar.setAttribute('aria-valuetext', steps ? `step ${step} of ${steps}` : job.state);
    $('job-eta').textContent = TERMINAL.has(job.state) ? '–' : fmtSeconds(job.eta_seconds);
    $('job-worker').textContent = job.worker || '–';
    const m = job.memory;
    $('job-memory').textContent = m ? `${fmtBytes(m.peak_allocated_bytes)} allocated · ${fmtBytes(m.peak_reserved_bytes)} reserved` : '–';
    showJobError(job.state === 'failed' ? job.error || 'the job failed (no reason given)' : '');
    $('job-cancel').hidden = TERMINAL.has(job.state);
    if (!prev || prev.state !== job.state) $('job-status').textContent = `video ${job.state}`;
    remember(job.id, prompt, job.state);
    if (job.state === 'completed' && current.resultFor !== job.id) {
      current.resultFor = job.id;
      loadResult(job, current.ctl.signal);
    }
    if (job.state !== 'completed') $('result').hidden = true;
  }

  async function loadResult(job, signal) {
    releaseBlobs();
    const id = job.id;
    try {
      const [mp4, gif] = await Promise.all([blobUrl(link(job, 'content'), signal), blobUrl(link(job, 'preview'), signal)]);
      blobs.push(mp4, gif);
      if (!current || current.id !== id) return;
      const v = $('job-video');
      v.src = mp4;
      v.load();
      v.play().catch(() => { /* autoplay refused: the controls are there */ });
      $('job-preview').src = gif;
      $('link-mp4').href = mp4;
      $('link-mp4').download = `${id}.mp4`;
      $('link-gif').href = gif;
      $('link-gif').download = `${id}.gif`;
      $('result').hidden = false;
      const side = await blobUrl(link(job, 'sidecar'), signal).catch(() => null);
      if (side) { blobs.push(side); $('link-sidecar').href = side; }
      $('link-sidecar').parentElement.hidden = !side;
      const hasSnap = !!(job.links && job.links.memory_snapshot);
      $('li-snapshot').hidden = true;
      if (hasSnap) {
        const snap = await blobUrl(link(job, 'memory_snapshot'), signal);
        blobs.push(snap);
        $('link-snapshot').href = snap;
        $('li-snapshot').hidden = false;
      }
    } catch (e) {
      if (e && e.name === 'AbortError') return;
      showJobError(`could not load the finished video: ${e.message}`);
      needKey(e);
    }
  }

  /** Read the job's SSE stream (fetch, so the API key header goes along) until it ends. */
  async function followEvents(job, signal) {
    const res = await fetch(link(job, 'events'), { headers: authHeaders({ accept: 'text/event-stream' }), signal, cache: 'no-store' });
    if (!res.ok || !res.body) {
      const text = await res.text().catch(() => '');
      let json = null;
      try { json = JSON.parse(text); } catch { /* not JSON */ }
      throw errorFrom(res, json, text);
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    let event = 'message';
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buf += value;
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          let line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.endsWith('\r')) line = line.slice(0, -1);
          if (line === '') {
            if (data.length) {
              let body = null;
              try { body = JSON.parse(data.join('\n')); } catch { /* not JSON: ignored */ }
              if (body && typeof body === 'object' && body.id) {
                render(body);
                if (TERMINAL.has(body.state) || event === 'done') return;
              } else if (event === 'error' && body && body.error) {
                showJobError(body.error);
              }
            }
            event = 'message';
            data = [];
          } else if (line.startsWith(':')) {
            // comment / keep-alive
          } else {
            const c = line.indexOf(':');
            const field = c < 0 ? line : line.slice(0, c);
            let val = c < 0 ? '' : line.slice(c + 1);
            if (val.startsWith(' ')) val = val.slice(1);
            if (field === 'event') event = val;
            else if (field === 'data') data.push(val);
          }
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  async function watch(id) {
    if (current) current.ctl.abort();
    releaseBlobs();
    const ctl = new AbortController();
    current = { id, ctl, job: null, resultFor: null };
    renderMine();
    $('result').hidden = true;
    $('job-video').removeAttribute('src');
    $('job-preview').removeAttribute('src');
    showJobError('');
    let delay = 1000;
    while (!ctl.signal.aborted) {
      try {
        const job = await api(`v1/videos/${encodeURIComponent(id)}`, { signal: ctl.signal });
        render(job);
        if (TERMINAL.has(job.state)) return;
        await followEvents(job, ctl.signal);
        if (current && current.job && TERMINAL.has(current.job.state)) return;
        delay = 1000; // the stream ended early (server restart, proxy timeout): reconnect
      } catch (e) {
        if (ctl.signal.aborted || (e && e.name === 'AbortError')) return;
        if (e.status === 404) {
          $('job-empty').hidden = true;
          $('job').hidden = false;
          showJobError(e.message);
          return;
        }
        if (needKey(e)) {
          showJobError(e.message);
          return;
        }
        showJobError(`${e.message} (retrying in ${Math.round(delay / 1000)} s)`);
        await sleep(delay, ctl.signal);
        delay = Math.min(10_000, delay * 2);
        continue;
      }
      await sleep(1000, ctl.signal);
    }
  }

  $('job-cancel').addEventListener('click', async () => {
    if (!current) return;
    const btn = $('job-cancel');
    btn.disabled = true;
    try {
      const r = await api(`v1/videos/${encodeURIComponent(current.id)}`, { method: 'DELETE' });
      if (current && r && r.id === current.id) {
        const job = Object.assign({}, current.job || {}, { id: r.id, state: r.state || 'cancelled' });
        render(job);
      }
    } catch (e) {
      showJobError(e.message);
      needKey(e);
    } finally {
      btn.disabled = false;
    }
  });

  // ---------------------------------------------------------------- queue, workers, health

  function cell(text, cls) {
    const td = document.createElement('td');
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function renderQueue(q) {
    const c = q.counts || {};
    for (const k of ['queued', 'active', 'completed', 'failed', 'cancelled']) $(`count-${k}`).textContent = typeof c[k] === 'number' ? String(c[k]) : '–';
    const tb = $('workers');
    tb.replaceChildren();
    const ws = Array.isArray(q.workers) ? q.workers : [];
    if (!ws.length) {
      const tr = document.createElement('tr');
      tr.append(cell('no worker is connected: start one with npm run worker', 'hint'));
      tr.firstChild.colSpan = 10;
      tb.append(tr);
    }
    for (const w of ws) {
      const m = w.memory || {};
      const tr = document.createElement('tr');
      tr.dataset.worker = w.id;
      const job = cell(w.job || '–');
      if (w.job) {
        job.replaceChildren();
        const a = document.createElement('a');
        a.href = `#video=${encodeURIComponent(w.job)}`;
        a.textContent = w.job.length > 12 ? `${w.job.slice(0, 12)}…` : w.job;
        a.title = w.job;
        job.append(a);
      }
      tr.append(
        cell(w.id || '–'),
        cell(w.host || '–'),
        cell(w.model || '–'),
        cell(w.state || '–', `state ${w.state === 'busy' ? 'active' : 'queued'}`),
        job,
        cell(fmtBytes(m.allocated_bytes), 'num'),
        cell(fmtBytes(m.reserved_bytes), 'num'),
        cell(fmtBytes(m.peak_allocated_bytes), 'num'),
        cell(typeof w.jobs_done === 'number' ? String(w.jobs_done) : '–', 'num'),
        cell(fmtAgo(w.last_seen)),
      );
      tb.append(tr);
    }
    $('queue-updated').textContent = `(updated ${new Date().toLocaleTimeString()})`;
  }

  function renderQueueError(msg) {
    for (const k of ['queued', 'active', 'completed', 'failed', 'cancelled']) $(`count-${k}`).textContent = '–';
    const tb = $('workers');
    const tr = document.createElement('tr');
    tr.append(cell(msg, 'error'));
    tr.firstChild.colSpan = 10;
    tb.replaceChildren(tr);
  }

  async function refreshHealth() {
    const el = $('health');
    try {
      const res = await fetch('healthz', { cache: 'no-store' });
      const j = await res.json().catch(() => null);
      const up = res.ok && j && j.ok;
      el.className = `health ${up ? 'up' : 'down'}`;
      el.textContent = up ? 'service up · redis up' : `service up · redis ${(j && j.redis) || 'down'}: no video can be queued until it is back`;
    } catch {
      el.className = 'health down';
      el.textContent = 'the service does not answer';
    }
  }

  let queueBusy = false;
  async function refreshQueue() {
    if (queueBusy) return;
    queueBusy = true;
    try {
      renderQueue(await api('v1/queue'));
    } catch (e) {
      renderQueueError(e.message);
      needKey(e);
    } finally {
      queueBusy = false;
    }
    refreshHealth();
  }

  window.addEventListener('hashchange', () => {
    const m = /^#video=(.+)$/.exec(location.hash);
    if (m) {
      const id = decodeURIComponent(m[1]);
      if (!current || current.id !== id) watch(id);
    }
  });

  // ---------------------------------------------------------------- start

  showKeyStatus();
  renderMine();
  const m = /^#video=(.+)$/.exec(location.hash);
  if (m) watch(decodeURIComponent(m[1]));
  refreshQueue();
  setInterval(() => { if (!document.hidden) refreshQueue(); }, QUEUE_EVERY_MS);
  document.addEventListener('visibilitychange', () => { if (!document.hidden) refreshQueue(); });
})();
