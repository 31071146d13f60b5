import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { LabIcon } from '@jupyterlab/ui-components';

import { INotebookLike, isNotebook } from './model';
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
    // The notebook a job is attached in: the one in front, else the last one that was (the panel has the focus
    // when its button is clicked, but the main area's current widget stays the notebook).
    let last: INotebookLike | null = null;
    const track = () => {
      if (isNotebook(shell.currentWidget)) {
        last = shell.currentWidget;
      }
    };
    shell.currentChanged.connect(track);
    track();
    const panel = new BurlaPanel({
      notebook: () => {
        track();
        const widget = last as (INotebookLike & { isDisposed?: boolean }) | null;
        return widget && !widget.isDisposed ? widget : null;
      },
      activate: notebook => shell.activateById(notebook.id)
    });
    panel.title.icon = new LabIcon({ name: 'burla:icon', svgstr: ICON });
    shell.add(panel, 'left', { rank: 900 });
  }
};

export default plugin;
