import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { LabIcon } from '@jupyterlab/ui-components';

import { BurlaPanel } from './panel';

const ICON = `<svg xmlns="http://www.w3.org/2000/svg" width="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161"><rect x="2" y="4" width="4" height="16" rx="1"/><rect x="8" y="4" width="4"
  height="16" rx="1"/><rect x="14" y="4" width="4" height="16" rx="1"/><rect x="20" y="4" width="2" height="16"
  rx="1"/></g></svg>`;

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'burla-labextension:panel',
  description: 'Burla in the left sidebar: cluster, workers, jobs and live logs',
  autoStart: true,
  requires: [ILabShell],
  activate: (app: JupyterFrontEnd, shell: ILabShell) => {
    const panel = new BurlaPanel();
    panel.title.icon = new LabIcon({ name: 'burla:icon', svgstr: ICON });
    shell.add(panel, 'left', { rank: 900 });
  }
};

export default plugin;
