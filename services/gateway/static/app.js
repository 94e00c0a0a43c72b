// The EchoX browser page: microphone → /ws as 16 kHz PCM16; the server's events (transcript,
// streaming answer text, latency, barge-in) on screen; answer audio played in order with Web Audio.
// The server decides turn ends and barge-in; the page only stops playback when told ("clear").
// The protocol is documented in services/gateway/web.py.
"use strict";

const RATE = 16000;
const $ = (id) => document.getElementById(id);

// What the page has seen, for people debugging and for the browser test.
window.echox = { state: "idle", turns: [], audio: { segments: 0, samples: 0, played: 0 }, events: [], errors: [] };

class Player {
  constructor(ctx, onPlayed) {
    this.ctx = ctx; this.onPlayed = onPlayed; this.playhead = 0; this.sources = new Set();
  }
  play(meta, pcm) {
    const int16 = new Int16Array(pcm);
    const floats = new Float32Array(int16.length);
    for (let i = 0; i < int16.length; i++) floats[i] = int16[i] / 32768;
    const buffer = this.ctx.createBuffer(1, Math.max(1, floats.length), meta.sample_rate || RATE);
    buffer.copyToChannel(floats, 0);
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.ctx.destination);
    const at = Math.max(this.ctx.currentTime + 0.03, this.playhead);  // segments back to back, in order
    source.start(at);
    this.playhead = at + buffer.duration;
    this.sources.add(source);
    source.onended = () => {
      this.sources.delete(source);
      if (!source.cleared) this.onPlayed(meta);
    };
  }
  clear() {
    for (const source of this.sources) { source.cleared = true; try { source.stop(); } catch (e) { /* not started */ } }
    this.sources.clear();
    this.playhead = 0;
  }
  get busy() { return this.sources.size > 0; }
}

class Conversation {
  constructor() { this.ws = null; this.ctx = null; this.stream = null; this.pendingAudio = null; this.views = {}; }

  async start() {
    setStatus("connecting…");
    const response = await fetch("/web/session", { method: "POST" });
    if (!response.ok) throw new Error(`cannot create a session (${response.status}): ${await response.text()}`);
    const session = await response.json();
    try { this.ctx = new AudioContext({ sampleRate: RATE }); } catch (e) { this.ctx = new AudioContext(); }
    await this.ctx.resume();
    this.player = new Player(this.ctx, (meta) => {
      window.echox.audio.played += 1;
      this.send({ type: "played", turn_id: meta.turn_id, index: meta.index });
      if (!this.player.busy) setStatus("listening");
    });
    // ?processing=off: the microphone as it is (a headset, a line input, a test's fake device);
    // otherwise the browser's echo cancellation keeps the agent's voice from interrupting itself.
    const processing = new URLSearchParams(location.search).get("processing") !== "off";
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: processing, noiseSuppression: processing, autoGainControl: processing },
    });
    await this.ctx.audioWorklet.addModule("/static/capture-worklet.js");
    const source = this.ctx.createMediaStreamSource(this.stream);
    this.capture = new AudioWorkletNode(this.ctx, "echox-capture");
    this.capture.port.onmessage = (e) => { if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(e.data); };
    source.connect(this.capture);
    await this.connect(session.ws_path);
  }

  connect(path) {
    return new Promise((resolve, reject) => {
      const scheme = location.protocol === "https:" ? "wss" : "ws";
      this.ws = new WebSocket(`${scheme}://${location.host}${path}`);
      this.ws.binaryType = "arraybuffer";
      this.ws.onmessage = (e) => {
        if (typeof e.data !== "string") { this.onAudio(e.data); return; }
        const event = JSON.parse(e.data);
        this.onEvent(event);
        if (event.type === "ready") resolve();
      };
      this.ws.onclose = (e) => {
        if (window.echox.state !== "idle" && e.code !== 1000) showError(`connection closed (${e.code}) ${e.reason}`);
        reject(new Error(`closed ${e.code}`));
        this.stop();
      };
    });
  }

  send(message) { if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message)); }

  onEvent(event) {
    window.echox.events.push(event);
    const view = event.turn_id ? this.turnView(event.turn_id) : null;
    switch (event.type) {
      case "ready": setStatus("listening"); break;
      case "speech_started": setStatus("you are talking…", true); break;
      case "turn_started": setStatus("thinking…"); break;
      case "transcript": view.turn.transcript = event.text; view.you.textContent = event.text; break;
      case "text": view.turn.text += event.text; view.agent.textContent = view.turn.text; break;
      case "latency":
        Object.assign(view.turn, { first_audio_ms: event.first_audio_ms, response_ms: event.response_ms });
        $("latency").textContent = `first audio ${event.response_ms} ms after you stopped talking ` +
          `(${event.first_audio_ms} ms after the end of your turn was detected)`;
        view.meta.textContent = `latency ${event.response_ms} ms`;
        setStatus("speaking"); break;
      case "audio": this.pendingAudio = event; break;
      case "clear": this.player.clear(); setStatus("listening"); break;
      case "barge_in": view.turn.interrupted = true; view.li.classList.add("interrupted"); break;
      case "done":
        Object.assign(view.turn, { done: true, cancelled: event.cancelled, total_ms: event.total_ms });
        if (event.cancelled) view.turn.heard = event.text;  // the part the caller heard before interrupting
        else view.turn.text = event.text || view.turn.text;
        view.agent.textContent = view.turn.text;
        if (event.cancelled) view.li.classList.add("interrupted");
        if (!this.player.busy) setStatus("listening");
        break;
      case "error":
        window.echox.errors.push(event);
        showError(`${event.code}: ${event.message}`); break;
      default: break;
    }
  }

  onAudio(data) {
    const meta = this.pendingAudio;
    this.pendingAudio = null;
    if (!meta) return;  // audio without its header: not ours to guess
    window.echox.audio.segments += 1;
    window.echox.audio.samples += data.byteLength / 2;
    this.turnView(meta.turn_id).turn.audio_segments += 1;
    this.player.play(meta, data);
  }

  turnView(turnId) {
    if (!this.views[turnId]) {
      const li = document.createElement("li");
      li.className = "turn";
      li.dataset.turnId = turnId;
      const you = Object.assign(document.createElement("div"), { className: "you", textContent: "…" });
      const agent = Object.assign(document.createElement("div"), { className: "agent" });
      const meta = Object.assign(document.createElement("div"), { className: "meta" });
      li.append(you, agent, meta);
      $("turns").append(li);
      const turn = { turn_id: turnId, transcript: "", text: "", audio_segments: 0, done: false };
      window.echox.turns.push(turn);
      this.views[turnId] = { li, you, agent, meta, turn };
    }
    return this.views[turnId];
  }

  stop() {
    window.echox.state = "idle";
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "hang up");
    if (this.player) this.player.clear();
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.ctx && this.ctx.state !== "closed") this.ctx.close();
    this.ws = null; this.stream = null; this.ctx = null;
    const button = $("talk");
    button.textContent = "Talk"; button.setAttribute("aria-pressed", "false");
    setStatus("idle");
  }
}

function setStatus(text, speaking = false) {
  $("status").textContent = text;
  $("status").classList.toggle("speaking", speaking);
}

function showError(text) {
  const el = $("error");
  el.textContent = text;
  el.hidden = false;
}

let conversation = null;
$("talk").addEventListener("click", async () => {
  const button = $("talk");
  if (conversation && window.echox.state !== "idle") { conversation.stop(); conversation = null; return; }
  $("error").hidden = true;
  conversation = new Conversation();
  window.echox.state = "connecting";
  button.textContent = "Hang up"; button.setAttribute("aria-pressed", "true");
  try {
    await conversation.start();
    window.echox.state = "live";
  } catch (e) {
    showError(String(e.message || e));
    conversation.stop();
    conversation = null;
  }
});
