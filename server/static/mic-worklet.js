// voxswap operator page: the live microphone's AudioWorklet (loaded by app.js with addModule).
// It runs on the browser's audio thread and only copies the microphone's samples out, about 50 ms
// at a time (the context's rate, mono); app.js downsamples them to 24 kHz PCM16 and sends them.
// Its own output stays silent: it is connected to the speakers only so that every browser runs it.
"use strict";

class VoxswapMicCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate / 20); // `sampleRate`: the context's, a global here
    this.block = new Float32Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0]; // the node downmixes to one channel (channelCount 1)
    if (!channel) return true; // no input connected yet
    let offset = 0;
    while (offset < channel.length) {
      const n = Math.min(channel.length - offset, this.size - this.filled);
      this.block.set(channel.subarray(offset, offset + n), this.filled);
      this.filled += n;
      offset += n;
      if (this.filled === this.size) {
        this.port.postMessage(this.block, [this.block.buffer]); // handed over, not copied
        this.block = new Float32Array(this.size); // (the posted one is detached: its length is 0 now)
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor("voxswap-mic-capture", VoxswapMicCapture);
