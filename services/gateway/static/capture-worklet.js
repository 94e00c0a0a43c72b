// Microphone → 16 kHz PCM16 frames of 20 ms, posted to the page (which sends them on the WebSocket).
// Resampling: a one-pole low-pass (when decimating) and linear interpolation: plenty for speech.
class EchoXCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / 16000;      // input samples per output sample
    this.alpha = this.ratio > 1 ? 1 - Math.exp(-2 * Math.PI * 7000 / sampleRate) : 1;
    this.low = 0; this.prev = 0; this.k = 0; this.t = 0;
    this.frame = new Int16Array(320); this.n = 0;
  }
  push(y) {
    const v = Math.max(-1, Math.min(1, y));
    this.frame[this.n++] = v < 0 ? v * 32768 : v * 32767;
    if (this.n === this.frame.length) {
      this.port.postMessage(this.frame.buffer, [this.frame.buffer]);
      this.frame = new Int16Array(320); this.n = 0;
    }
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      this.low += this.alpha * (channel[i] - this.low);
      const x = this.low;
      while (this.t <= this.k) {            // output samples between input k-1 and k
        const frac = this.t - (this.k - 1);
        this.push(this.prev + (x - this.prev) * frac);
        this.t += this.ratio;
      }
      this.prev = x; this.k += 1;
    }
    return true;
  }
}
registerProcessor("echox-capture", EchoXCapture);
